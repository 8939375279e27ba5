"""`mrisr demo`: the main job on the embedded example, with numbers and a picture.

The example (a coronal slab of an MIT-licensed T1, see ``example/README.md``) is bias-corrected
(N4) when the model's training data were, as `mrisr prepare` does, then degraded with the model's
own k-space settings and written as ``lr.nii.gz``; that file goes through exactly what
`mrisr upsample --no-n4 lr.nii.gz sr.nii.gz` does (sidecar included), and the result is compared
with the (corrected) original; a PNG shows the same coronal slice of HR, LR and SR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from mrisr_cli.degradation import DegradationConfig, degrade_volume
from mrisr_cli.errors import OutputError
from mrisr_cli.inference import InferenceOptions, ProgressCallback
from mrisr_cli.intensity import foreground_mask
from mrisr_cli.metrics import normalise_pair, psnr, ssim
from mrisr_cli.n4 import n4_correct
from mrisr_cli.pipeline import Generator, UpsampleOptions, sidecar_path, upsample_file
from mrisr_cli.volumes import atomic_path, check_output_path, load_volume, save_volume

EXAMPLE_NAME = "brainchop_t1_coronal_slab.nii.gz"


def example_path() -> Path:
    """Where the embedded example volume is installed."""
    return Path(str(resources.files("mrisr_cli") / "example" / EXAMPLE_NAME))


@dataclass
class DemoReport:
    """Files written and PSNR/SSIM (against ``hr.nii.gz``) of each written volume."""

    files: dict[str, Path] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    #: what hr.nii.gz is: the example as stored, or N4-corrected as the model's training data
    reference: str = "the example"


def _scores(hr: np.ndarray, other: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    ref, pred = normalise_pair(hr, other)
    return {"psnr": psnr(ref, pred, mask=mask), "ssim": ssim(ref, pred, mask=mask)}


def save_slices_png(path: Path, volumes: dict[str, np.ndarray], *, overwrite: bool) -> None:
    """The middle coronal slice (canonical axis 1) of each volume, side by side, same scale.

    Matplotlib's object API (no pyplot): the caller's backend (a notebook's) and figures are
    left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = next(iter(volumes.values()))
    index = first.shape[1] // 2
    vmax = float(np.percentile(first, 99.5))
    figure = Figure(figsize=(3.2 * len(volumes), 3.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(volumes))
    for ax, (name, volume) in zip(np.atleast_1d(axes), volumes.items(), strict=True):
        ax.imshow(volume[:, index, :].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        ax.set_title(name)
        ax.axis("off")
    figure.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, dpi=120, format="png")


def run_demo(
    out_dir: Path | str,
    generator: Generator | None,
    *,
    options: InferenceOptions,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> DemoReport:
    """Degrade, super-resolve (when a generator is given), score and draw the example."""
    out_dir = Path(out_dir)
    names = {key: out_dir / f"{key}.nii.gz" for key in ("hr", "lr", "sr")}
    names_png = out_dir / "demo.png"
    outputs = [names["hr"], names["lr"], names_png]
    if generator is not None:
        outputs += [names["sr"], sidecar_path(names["sr"])]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{out_dir}: cannot create the output folder ({reason})") from exc
    for path in outputs:
        check_output_path(path, overwrite=overwrite)
    volume = load_volume(example_path())
    config = generator.weights.degradation if generator else DegradationConfig()
    hr = volume.data
    if config.n4:  # the model's ground truth was bias-corrected before it was degraded (prepare)
        hr = n4_correct(hr, volume.spacing)
    lr = degrade_volume(hr, config, affine=volume.affine)
    mask = foreground_mask(hr)
    report = DemoReport(reference="the N4-corrected example" if config.n4 else "the example")
    hr_title = "HR (N4-corrected)" if config.n4 else "HR (original)"
    pictures = {hr_title: hr, "LR (k-space degraded)": lr}
    for key, data in (("hr", hr), ("lr", lr)):
        save_volume(names[key], data, volume.affine, volume.header, overwrite=overwrite)
        report.files[key] = names[key]
    report.scores["lr"] = _scores(hr, lr, mask)
    if generator is not None:
        # the LR comes from the corrected HR: like the test split (tools/train_release.py), it is
        # not corrected again; N4 fitted anew on the degraded slab moves it off the HR's field
        upsample = UpsampleOptions(inference=options, n4=False, overwrite=overwrite)
        upsample_file(names["lr"], names["sr"], generator, upsample, progress)
        sr = load_volume(names["sr"]).data
        report.files["sr"] = names["sr"]
        report.scores["sr"] = _scores(hr, sr, mask)
        pictures[f"SR (alpha {generator.alpha:g})"] = sr
    elif overwrite:  # an earlier run's SR beside this run's HR and LR would mix two runs
        for path in (names["sr"], sidecar_path(names["sr"])):
            path.unlink(missing_ok=True)
    save_slices_png(names_png, pictures, overwrite=overwrite)
    report.files["png"] = names_png
    return report
