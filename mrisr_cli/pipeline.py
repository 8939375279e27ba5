"""`mrisr upsample` as library functions: load the generator once, then super-resolve files.

Order of operations for one input: read and check -> plan the grid (canonical axes, 1 mm,
coarse axes in the model's degraded slots) -> optional N4 -> z-score from the input's own
foreground -> tile, run, stitch -> back to the input's units -> N4's field put back (unless the
corrected image is asked for) -> the input's flat background kept -> back to its axes and
orientation -> atomic write -> JSON sidecar with what produced the file.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from mrisr_cli import __version__
from mrisr_cli.blending import blend_weights, check_alpha
from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.errors import InputError, MrisrError, MrisrWarning, OutputError, WeightsError
from mrisr_cli.grid import GridPlan, plan_grid
from mrisr_cli.inference import (
    InferenceOptions,
    ProgressCallback,
    resolve_device,
    resolve_options,
    super_resolve,
)
from mrisr_cli.intensity import flat_background, foreground_mask, foreground_stats
from mrisr_cli.n4 import BiasField, n4_fit
from mrisr_cli.volumes import (
    Volume,
    atomic_path,
    check_not_label_map,
    check_output_path,
    check_t1_name,
    checked_array,
    image_volume,
    load_volume,
    os_reason,
    strip_suffix,
    volume_image,
    write_volume,
)
from mrisr_cli.weights import WeightsFile, load_weights, sha256_of

DEFAULT_PSNR_NAME = "rrdg_psnr.safetensors"
DEFAULT_GAN_NAME = "rrdg_gan.safetensors"
#: What error messages call an image given in memory, without a file name.
IN_MEMORY_NAME = "image"


def default_weights_dir() -> Path:
    """``$MRISR_WEIGHTS``; else the checkout's ``weights/`` folder (a source or editable install);
    else the copy that a wheel installs inside the package, ``mrisr_cli/shipped_weights``."""
    env = os.environ.get("MRISR_WEIGHTS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    checkout = package.parent / "weights"
    installed = package / "shipped_weights"
    if (checkout / DEFAULT_PSNR_NAME).is_file() or not installed.is_dir():
        return checkout
    return installed


@dataclass
class Generator:
    """A ready-to-run generator and the record of where its weights came from."""

    model: nn.Module
    weights: WeightsFile
    alpha: float
    sources: list[dict[str, str]] = field(default_factory=list)


@dataclass
class GeneratorFiles:
    """The weights files behind ``--alpha``: loaded once, blended per alpha."""

    psnr: WeightsFile | None
    gan: WeightsFile | None

    def sources(self) -> list[dict[str, str]]:
        return [
            {"role": role, "path": os.path.abspath(w.path), "sha256": w.sha256}
            for role, w in (("psnr", self.psnr), ("gan", self.gan))
            if w is not None
        ]

    def warnings(self) -> list[str]:
        """What the files' provenance says against blending them as given: a file trained in
        the other stage (the roles swapped), or a GAN model not fine-tuned from this PSNR model
        (equation 3 interpolates between a model and its own fine-tuned copy)."""
        found = []

        def provenance(weights: WeightsFile | None) -> dict[str, Any]:
            recorded = weights.provenance if weights is not None else None
            return recorded if isinstance(recorded, dict) else {}  # a hand-made file: anything

        for role, weights in (("psnr", self.psnr), ("gan", self.gan)):
            stage = provenance(weights).get("stage")
            if weights is not None and stage in ("psnr", "gan") and stage != role:
                found.append(
                    f"{weights.path}: trained as the {stage.upper()} model, given as "
                    f"--{role}-weights"
                )
        if self.psnr is not None and self.gan is not None:
            recorded = provenance(self.gan)
            init = recorded.get("init")
            start = init.get("sha256") if isinstance(init, dict) else None
            origin = recorded.get("psnr_origin")  # through GAN runs continued from GAN files
            start = origin if isinstance(origin, str) else start
            if isinstance(start, str) and start != self.psnr.sha256:
                found.append(
                    f"{self.gan.path}: fine-tuned from another model (sha256 {start[:12]}) than "
                    f"{self.psnr.path} ({self.psnr.sha256[:12]}): the blend mixes unrelated weights"
                )
        return found

    @property
    def degradation(self) -> DegradationConfig:
        """The degradation the files were trained for (blending requires both to agree)."""
        return (self.psnr or self.gan).degradation  # type: ignore[union-attr]

    def check(self, alpha: float) -> float:
        """``alpha`` if these files can make it, else why not: one file alone gives only its own
        end of the blend."""
        alpha = check_alpha(alpha)
        if self.gan is None and alpha != 1.0:
            raise MrisrError(f"--alpha {alpha:g} blends in a GAN model: give --gan-weights too")
        if self.psnr is None and alpha != 0.0:
            raise MrisrError(f"--alpha {alpha:g} blends in a PSNR model: give --psnr-weights too")
        return alpha

    def generator(self, alpha: float, device: str) -> Generator:
        """The blended generator for one alpha, on ``device`` (``auto``, ``cpu``, ``cuda[:N]``:
        checked first, as the CLI checks ``--device``)."""
        device = resolve_device(device)
        alpha = self.check(alpha)
        if self.psnr is not None and self.gan is not None:
            weights = blend_weights(self.psnr, self.gan, alpha)
        elif self.psnr is not None or self.gan is not None:
            weights = self.psnr or self.gan
        else:  # pragma: no cover - load_generator_files never returns this
            raise WeightsError("no weights")
        model = weights.build().to(device)
        return Generator(model=model, weights=weights, alpha=alpha, sources=self.sources())


def load_generator_files(psnr: Path | None, gan: Path | None) -> GeneratorFiles:
    """Named files, or the installed defaults when neither is named."""
    if psnr is None and gan is None:
        folder = default_weights_dir()
        psnr_default, gan_default = folder / DEFAULT_PSNR_NAME, folder / DEFAULT_GAN_NAME
        if not psnr_default.is_file():
            if os.environ.get("MRISR_WEIGHTS"):
                raise WeightsError(
                    f"MRISR_WEIGHTS={folder}: that folder holds no {DEFAULT_PSNR_NAME}; set "
                    "MRISR_WEIGHTS to the folder that does, or pass --psnr-weights/--gan-weights"
                )
            raise WeightsError(
                f"no trained weights are installed in {folder} (the release ships them in the "
                "repository's weights/ folder); pass --psnr-weights/--gan-weights or set "
                "MRISR_WEIGHTS"
            )
        psnr = psnr_default
        gan = gan_default if gan_default.is_file() else None
    files = GeneratorFiles(
        psnr=load_weights(psnr) if psnr is not None else None,
        gan=load_weights(gan) if gan is not None else None,
    )
    for w in (files.psnr, files.gan):
        if w is not None and w.network.name == "patch_discriminator":
            raise WeightsError(f"{w.path}: holds a discriminator, not a generator")
    return files


@dataclass(frozen=True)
class UpsampleOptions:
    """Per-file options of `mrisr upsample`."""

    inference: InferenceOptions = field(default_factory=InferenceOptions)
    n4: bool | None = None  # None: as the model was trained
    #: with N4: write the corrected result instead of putting the input's bias field back
    bias_corrected: bool = False
    #: voxels of the input's flat background (:func:`~mrisr_cli.intensity.flat_background`) keep
    #: the input's value instead of the network's output; False: the network's output
    #: everywhere, tiles of only air run as well (``InferenceOptions.skip_background`` off)
    keep_background: bool = True
    overwrite: bool = False
    sidecar: bool = True
    #: warnings about the whole run (the caller prints them once), recorded in every sidecar
    run_warnings: tuple[str, ...] = ()

    def uses_n4(self, degradation: DegradationConfig) -> bool:
        """Whether N4 runs: ``n4`` where given, else as the weights were trained."""
        return degradation.n4 if self.n4 is None else self.n4

    def skips_air_tiles(self) -> bool:
        """Whether tiles of only air keep the input's values: by default; not with
        ``keep_background`` off, which asks for the network's output everywhere."""
        return self.keep_background and self.inference.skip_background


@dataclass
class UpsampleResult:
    """What happened to one input: shapes, grid decisions, timings, warnings."""

    input: Path
    output: Path
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    resampled: bool
    seconds: dict[str, float]
    warnings: list[str]
    background_kept: int = 0  # voxels that kept the input's flat background value


def sidecar_path(output: Path | str) -> Path:
    """``out.nii.gz`` -> ``out.json`` (BIDS-style sidecar)."""
    output = Path(output)
    return output.with_name(strip_suffix(output.name) + ".json")


def upsample_array(
    data: np.ndarray,
    generator: Generator,
    *,
    options: InferenceOptions,
    progress: ProgressCallback | None = None,
    nonnegative: bool | None = None,
) -> np.ndarray:
    """Normalise with the array's own foreground, run the network, map back to its units.

    The network step alone, on an array that is already on the model's grid: 3D, in canonical
    RAS+ voxel order, with voxels of the weights' spacing (``degradation.spacing_mm``, 1 mm)
    and the coarse (through-plane) axes in the model's degraded axes (``degradation.axes``,
    axes 0 and 2 for the shipped models). Its intensities may be in any units: the z-score is
    computed here from the array's own foreground and undone on the output, so a scan in its
    own units and the same scan already z-scored give the same result, each in its units.
    Nothing else is done: no reorientation, resampling or axis permutation, no N4, no kept flat
    background. Any other array gives a wrong result without an error; for a scan as it comes
    use :func:`upsample_image` (a nibabel image) or :func:`upsample_file`. Non-finite,
    constant or non-3D arrays are an InputError (:func:`~mrisr_cli.volumes.checked_array`).

    ``nonnegative`` clips the output at 0; by default it does when ``data`` has no negative
    value. :func:`upsample_file` passes False and clips by the original image once N4's field is
    back: ``data`` there is bias-corrected, and N4 moves an exact-zero background below 0.
    """
    data = checked_array(data, "upsample_array")
    stats = foreground_stats(data, foreground_mask(data))  # the mask crops to boxes itself
    out = super_resolve(stats.normalise(data), generator.model, options, progress)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported just below
        out = stats.denormalise(out)
    if not np.isfinite(out).all():
        raise MrisrError(
            "the network's output holds NaN or infinite values"
            + (" (an fp16 overflow: try without --half)" if options.half else "")
        )
    if data.min() >= 0 if nonnegative is None else nonnegative:
        np.maximum(out, 0.0, out=out)
    return out


@dataclass
class PreparedInput:
    """One input read, planned onto the model's grid and (with N4) bias-corrected: what every
    alpha of it shares, so that several alphas read the file and fit N4 once."""

    path: Path
    volume: Volume
    plan: GridPlan
    data: np.ndarray  # on the model grid, N4's field divided out
    bias: BiasField | None  # fitted (None: N4 off)
    use_n4: bool
    background: np.ndarray | None  # the flat background to keep, on the model grid
    background_value: float
    seconds: dict[str, float]  # "read", "n4"
    sha256: str = ""  # of the input file: what --skip-existing recognises it by
    charged: bool = False  # whether an output's "total" has counted the shared read and N4


def prepare_input(
    input_path: Path | str,
    degradation: DegradationConfig,
    options: UpsampleOptions,
    *,
    sha256: str | None = None,
) -> PreparedInput:
    """Read and check an input, plan its grid and fit N4 as the weights' ``degradation`` says
    (unless ``options.n4`` decides); ``sha256``: the file's, where the caller has it already."""
    started = time.perf_counter()
    input_path = Path(input_path)
    check_t1_name(input_path)
    volume = load_volume(input_path)
    prepared = prepare_volume(volume, degradation, options, started=started)
    prepared.sha256 = sha256 or _input_sha256(input_path)
    return prepared


def prepare_volume(
    volume: Volume,
    degradation: DegradationConfig,
    options: UpsampleOptions,
    *,
    started: float | None = None,
) -> PreparedInput:
    """:func:`prepare_input` for a volume already read and checked (:func:`upsample_image`'s
    in-memory image): the same checks, grid and N4, so both give the same voxels.

    ``started``: when reading began, so that the "read" time counts it (default: now).
    """
    started = time.perf_counter() if started is None else started
    name = _volume_name(volume)
    check_not_label_map(volume.data, name)
    plan = plan_grid(volume.affine, volume.data.shape, degradation)  # type: ignore[arg-type]
    data = plan.to_model(volume.data)
    loaded = time.perf_counter()
    background = flat_background(data) if options.keep_background else None
    background_value = float(data.min())
    use_n4 = options.uses_n4(degradation)
    # the network sees corrected intensities, as in training; the output keeps the input's
    # shading unless the corrected image is asked for, so it compares with the input's reference
    bias = n4_fit(data, plan.model_spacing) if use_n4 else None
    if bias is not None:
        data = bias.remove(data)
    corrected = time.perf_counter()
    return PreparedInput(
        path=volume.path if volume.path is not None else Path(name),
        volume=volume,
        plan=plan,
        data=data,
        bias=bias,
        use_n4=use_n4,
        background=background,
        background_value=background_value,
        seconds={"read": loaded - started, "n4": corrected - loaded},
    )


def _volume_name(volume: Volume) -> str:
    """What error messages call a volume: its file, or "image" for one made in memory."""
    return str(volume.path) if volume.path is not None else IN_MEMORY_NAME


def _input_sha256(path: Path) -> str:
    """The input's sha256, recorded for ``--skip-existing`` (about 0.05 s for a 10 MB scan)."""
    try:
        return sha256_of(path)
    except OSError as exc:  # removed or locked since it was read
        raise InputError(f"{path}: cannot be read ({os_reason(exc)})") from exc


def upsample_file(
    input_path: Path | str,
    output_path: Path | str,
    generator: Generator,
    options: UpsampleOptions,
    progress: ProgressCallback | None = None,
) -> UpsampleResult:
    """Super-resolve one file onto the model's grid and write it (atomically) with a sidecar.

    ``half`` where it would only be emulated runs fp32 (:func:`~mrisr_cli.inference.super_resolve`
    decides); the result's warnings then say so.
    """
    output_path = Path(output_path)
    check_output_path(output_path, overwrite=options.overwrite)
    if options.sidecar:
        check_output_path(sidecar_path(output_path), overwrite=options.overwrite)
    prepared = prepare_input(input_path, generator.weights.degradation, options)
    return upsample_prepared(prepared, output_path, generator, options, progress)


def upsample_image(
    image: nib.spatialimages.SpatialImage,
    generator: Generator,
    options: UpsampleOptions | None = None,
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> nib.Nifti1Image:
    """:func:`upsample_file` in memory: a nibabel image in (any orientation, 1 mm or coarser
    voxels, the input's own units), the image that ``upsample_file`` would write out.

    The whole job, as for a file: the input's checks, its grid (canonical axes, 1 mm, coarse
    axes in the model's degraded slots), N4 as the weights say, the flat background kept, and
    back to the input's axes and geometry. Only the file's name is not checked (a T2w name),
    and ``options``' file settings (overwrite, sidecar) do not apply. The warnings that
    ``upsample_file`` returns in its result (an oblique or too-fine grid, ``half`` falling back
    to fp32...) go to ``warn``, one line each; without it they are issued as
    :class:`~mrisr_cli.errors.MrisrWarning` through Python's :mod:`warnings`.
    """
    options = options or UpsampleOptions()
    name = image.get_filename() if isinstance(image, nib.spatialimages.SpatialImage) else None
    volume = image_volume(image, name or IN_MEMORY_NAME)
    volume.path = Path(name) if name else None
    prepared = prepare_volume(volume, generator.weights.degradation, options)
    inference, half_warning = _run_options(options, generator)
    for message in _run_warnings(prepared, options, half_warning):
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, MrisrWarning, stacklevel=2)
    out = _output_data(prepared, generator, options, inference, progress)
    return volume_image(out, prepared.plan.output_affine(), volume.header)  # as written


def upsample_prepared(
    prepared: PreparedInput,
    output_path: Path | str,
    generator: Generator,
    options: UpsampleOptions,
    progress: ProgressCallback | None = None,
) -> UpsampleResult:
    """Run one generator on a prepared input and write the output (atomically) with a sidecar;
    the input is left as it was, for the next alpha."""
    started = time.perf_counter()
    output_path = Path(output_path)
    inference, half_warning = _run_options(options, generator)
    check_output_path(output_path, overwrite=options.overwrite)
    if options.sidecar:
        check_output_path(sidecar_path(output_path), overwrite=options.overwrite)
    plan = prepared.plan
    out = _output_data(prepared, generator, options, inference, progress)
    inferred = time.perf_counter()
    output_path, sidecar = Path(output_path), sidecar_path(Path(output_path))
    # should an --overwrite fail half-way, the earlier sidecar goes back beside the earlier image
    earlier = _link_aside(sidecar) if options.sidecar and options.overwrite else None
    placed: os.stat_result | None = None  # the sidecar this call put in place
    try:
        # the sidecar goes into place before the image: a job killed in between leaves a
        # sidecar without its image, which --skip-existing redoes, never an image without one
        with atomic_path(output_path, overwrite=options.overwrite) as tmp:
            header = prepared.volume.header
            write_volume(tmp, out, plan.output_affine(), header, name=output_path)
            output_sha256 = sha256_of(tmp) if options.sidecar else ""
            written = time.perf_counter()
            result = _result(prepared, output_path, out.shape, options, half_warning)
            # the shared read and N4 count in the first output's total only, so totals add up
            shared = 0.0 if prepared.charged else prepared.seconds["read"] + prepared.seconds["n4"]
            result.seconds.update(
                network=inferred - started,
                write=written - inferred,
                total=written - started + shared,
            )
            if options.sidecar:
                try:
                    resolved = replace(options, inference=inference)
                    write_sidecar(
                        result, generator, resolved, prepared.use_n4, prepared.sha256, output_sha256
                    )
                except OSError as exc:
                    raise OutputError(
                        f"{sidecar}: cannot be written ({os_reason(exc)}); "
                        f"{output_path} was not written either"
                    ) from exc
                placed = sidecar.stat()
    except BaseException as exc:
        if placed is not None:  # the image did not make it into place: its record goes too
            _take_back(sidecar, placed, earlier)
        if isinstance(exc, OSError):  # the image's rename, or reading it back for its sha256
            raise OutputError(f"{output_path}: could not write ({os_reason(exc)})") from exc
        raise
    finally:
        if earlier is not None:
            earlier.unlink(missing_ok=True)
    prepared.charged = True
    return result


def _run_options(
    options: UpsampleOptions, generator: Generator
) -> tuple[InferenceOptions, str | None]:
    """The inference options as they run (:func:`resolve_options`; tiles of only air run too
    without ``keep_background``), and the warning of a ``half`` that runs fp32."""
    inference, half_warning = resolve_options(options.inference, generator.model)
    if not options.skips_air_tiles():
        inference = replace(inference, skip_background=False)
    return inference, half_warning


def _output_data(
    prepared: PreparedInput,
    generator: Generator,
    options: UpsampleOptions,
    inference: InferenceOptions,
    progress: ProgressCallback | None,
) -> np.ndarray:
    """The output's voxels, in the input's axis order on the model grid: the network's result
    with N4's field put back, clipped, and the input's flat background kept."""
    plan = prepared.plan
    out = upsample_array(
        plan.permute(prepared.data),
        generator,
        options=inference,
        progress=progress,
        nonnegative=False,
    )
    out = plan.unpermute(out)
    if prepared.bias is not None and not options.bias_corrected:
        out = prepared.bias.restore(out)
    # a magnitude image stays non-negative: clipped here, after the field is back, because N4
    # moves an exact-zero background below 0 and putting the field back can too
    if prepared.volume.data.min() >= 0:
        np.maximum(out, 0.0, out=out)
    if prepared.background is not None:
        out[prepared.background] = prepared.background_value
    return plan.to_output(out)


def _link_aside(path: Path) -> Path | None:
    """A hidden hard link to ``path`` as it is now (None: there is none, or the file system
    makes no links), so that it can be put back by a rename: no space needed, mode kept."""
    if not path.is_file():
        return None
    aside = path.with_name(f".{path.name}.{os.getpid()}.earlier")
    try:
        aside.unlink(missing_ok=True)
        os.link(path, aside)
    except OSError:
        return None
    return aside


def _take_back(path: Path, placed: os.stat_result, earlier: Path | None) -> None:
    """Undo this call's sidecar at ``path``: the ``earlier`` one back, or none; a file another
    run placed there since is left alone. Never in the way of the error that made it necessary."""
    with suppress(OSError):
        now = path.stat()
        if (now.st_ino, now.st_mtime_ns) != (placed.st_ino, placed.st_mtime_ns):
            return
        try:
            if earlier is None:
                path.unlink()
            else:
                os.replace(earlier, path)
        except OSError:
            path.unlink()


def _run_warnings(
    prepared: PreparedInput, options: UpsampleOptions, half_warning: str | None
) -> list[str]:
    """What a user should know about one input's run: its grid's warnings, ``half`` falling
    back, ``bias_corrected`` without N4."""
    return (
        list(prepared.plan.warnings)
        + ([half_warning] if half_warning else [])
        + (
            ["--bias-corrected: these weights run without N4, so there is no field to leave out"]
            if options.bias_corrected and not prepared.use_n4
            else []
        )
    )


def _result(
    prepared: PreparedInput,
    output_path: Path,
    shape: tuple[int, ...],
    options: UpsampleOptions,
    half_warning: str | None,
) -> UpsampleResult:
    """What :func:`upsample_prepared` reports (its ``seconds`` still without the network's)."""
    return UpsampleResult(
        input=prepared.path,
        output=output_path,
        input_shape=tuple(prepared.volume.data.shape),
        output_shape=tuple(shape),
        resampled=prepared.plan.resampled,
        seconds=dict(prepared.seconds),
        warnings=_run_warnings(prepared, options, half_warning),
        background_kept=int(prepared.background.sum()) if prepared.background is not None else 0,
    )


def output_settings(options: UpsampleOptions, n4: bool) -> dict[str, Any]:
    """The settings that change an output's voxels, as its sidecar records them: an earlier
    output is taken as finished by ``--skip-existing`` only when they are the same."""
    inference = options.inference
    return {
        "n4": n4,
        # N4's field: removed before the network; put back into the output, or left out of it
        "bias_field": ("removed" if options.bias_corrected else "restored") if n4 else None,
        "keep_background": options.keep_background,
        "air_tiles": "input" if options.skips_air_tiles() else "network",  # tiles of only air
        "patch": list(inference.patch),
        "margin": inference.margin,
        "overlap": inference.overlap,
    }


def write_sidecar(
    result: UpsampleResult,
    generator: Generator,
    options: UpsampleOptions,
    n4: bool,
    input_sha256: str,
    output_sha256: str,
) -> None:
    """Record what produced an output, next to it: the tiling and precision as they ran
    (``options.inference`` already resolved by :func:`~mrisr_cli.inference.resolve_options`)."""
    inference = options.inference
    record = {
        "mrisr_version": __version__,
        "torch_version": torch.__version__,
        "input": os.path.abspath(result.input),  # the sidecar may be read from anywhere
        "input_sha256": input_sha256,
        "output": os.path.abspath(result.output),
        "output_sha256": output_sha256,  # --skip-existing: the image is the one this run wrote
        "weights": generator.sources,
        "network": {"name": generator.weights.network.name, **generator.weights.network.params},
        "alpha": generator.alpha,
        "alpha_convention": "theta = alpha*PSNR + (1-alpha)*GAN (1 = PSNR model, 0 = GAN model)",
        "device": inference.device,
        "threads": torch.get_num_threads(),
        "precision": ("fp16" if inference.device.startswith("cuda") else "bf16")
        if inference.half
        else "fp32",
        "half": inference.half,
        **output_settings(options, n4),
        "background_voxels_kept": result.background_kept,
        "input_shape": list(result.input_shape),
        "output_shape": list(result.output_shape),
        "resampled_to_model_grid": result.resampled,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "warnings": [*options.run_warnings, *result.warnings],
    }
    path = sidecar_path(result.output)
    with atomic_path(path, overwrite=options.overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
