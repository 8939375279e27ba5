"""Seconds per subject pair of `mrisr evaluate` on a 1 mm whole brain, on the CPU threads given.

    python benchmarks/bench_evaluate.py                 # all configurations
    python benchmarks/bench_evaluate.py --no-highres    # skip the (slow on CPU) network part
    python benchmarks/bench_evaluate.py --shape 48,56,48 --threads 2   # a quick smoke run

The pair is a real 1 mm brain ($MRISR_DATA or ../shared/data: t1/S15_antsxnet_brainSR_brainonly,
134 x 173 x 138) and its k-space degraded version; without the data, a synthetic volume of the
same size. It runs the library path of the command (files read, mask, N4, metrics) once per
configuration:

1. image metrics only (SSIM/PSNR/NRMSE, whole volume and mask; HF power and correlation in the
   mask): ``--no-tissue``
2. + N4 and tissue Dice (the default without weights)
3. + HighRes3DNet M_h and parcellation Dice (``--parcellation-weights``); with the pretrained
   file when present, else a randomly initialised network of the same size (same cost).

Each row also gives its seconds over those of configuration 1 (the cheapest), in the same run.
``--threads`` (default: SLURM_CPUS_PER_TASK or OMP_NUM_THREADS where set, else the CPUs this
process may use, cgroup CPU quota included) is applied to torch, ITK (ANTsPy's N4) and OpenMP
through ``mrisr_cli.threads.configure_threads``, as `mrisr evaluate --threads` does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

from mrisr_cli.degradation import DegradationConfig, degrade_volume
from mrisr_cli.evaluation import EvaluationOptions, evaluate
from mrisr_cli.networks.highres3dnet import HighRes3DNet
from mrisr_cli.threads import configure_threads

REPO = Path(__file__).resolve().parents[1]
VOLUME = "t1/S15_antsxnet_brainSR_brainonly.nii.gz"
WEIGHTS = "parcellation/highresnet/highres3dnet_li_parameters-7d297872.pth"
SHAPE = (134, 173, 138)


def data_dir() -> Path | None:
    folder = Path(os.environ.get("MRISR_DATA", REPO.parent / "shared" / "data"))
    return folder if folder.is_dir() else None


def synthetic_brain(shape: tuple[int, int, int]) -> np.ndarray:
    """An ellipsoid 'brain' with CSF/GM/WM-like shells and texture, zero background."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    radii = np.array(shape, dtype=np.float32)[:, None, None, None] * 0.45
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(axis=0))
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 2) * 60
    brain = np.select([r < 0.55, r < 0.85, r < 1.0], [300.0, 200.0, 60.0], 0.0) + texture
    return np.where(r < 1.0, np.clip(brain, 1, None), 0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch, ITK and OpenMP threads [all available]"
    )
    parser.add_argument("--shape", default=None, help="synthetic volume shape, e.g. 48,56,48")
    parser.add_argument("--no-highres", action="store_true", help="skip configuration 3")
    args = parser.parse_args()

    # torch, ITK (N4) and OpenMP; the default is resolve_thread_count's (cgroup quota included)
    threads = configure_threads(args.threads or None)
    folder = data_dir()
    affine = np.eye(4)
    if args.shape is None and folder is not None and (folder / VOLUME).exists():
        image = nib.load(str(folder / VOLUME))
        ref, affine, source = image.get_fdata(dtype=np.float32), image.affine, VOLUME
    else:
        shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else SHAPE
        ref, source = synthetic_brain(shape), f"synthetic {shape}"  # type: ignore[arg-type]
    pred = degrade_volume(ref, DegradationConfig(), affine=affine)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in (("hr", ref), ("sr", pred)):
            (root / name).mkdir()
            nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(root / name / "s.nii"))
        weights = folder / WEIGHTS if folder is not None else None
        if weights is None or not weights.exists():
            weights = root / "random_highres3dnet.pth"
            torch.save(HighRes3DNet().state_dict(), weights)
        configurations = [
            ("image metrics", EvaluationOptions(tissue=False, n4=False)),
            ("+ N4, tissue Dice", EvaluationOptions(tissue=True, n4=True)),
        ]
        if not args.no_highres:
            configurations.append(
                ("+ HighRes3DNet M_h, Dice", EvaluationOptions(weights=weights, n4=True))
            )
        # Warm-up: imports (torch, ANTs) and first-call costs are not per-pair costs.
        evaluate(root / "hr", [root / "sr"], options=configurations[1][1])

        print(f"volume: {source}, shape {ref.shape}; CPU threads: {threads}")
        print(f"{'configuration':<28} {'s / pair':>10} {'s / metrics s':>14}  result")
        reference = None
        for label, options in configurations:
            start = time.perf_counter()
            result = evaluate(root / "hr", [root / "sr"], options=options).results[0]
            seconds = time.perf_counter() - start
            if reference is None:  # the first row: image metrics only, the cheapest
                reference = seconds
            shown = {k: round(v, 4) for k, v in result.values.items()}
            digits = 1 if seconds >= 1 else 3  # under a second (a smoke run): 0.0 said nothing
            print(
                f"{label:<28} {seconds:>10.{digits}f} {seconds / reference:>13.2f}x  "
                f"{result.error or shown}"
            )
        print("s / metrics s: the row's seconds over the 'image metrics' row's, in this run")


if __name__ == "__main__":
    main()
