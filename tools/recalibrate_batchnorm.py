"""Recompute the BatchNorm statistics of a trained weights file over training patches.

    python tools/recalibrate_batchnorm.py --data data/prepared \\
        --weights weights/rrdg_psnr.safetensors --out /tmp/rrdg_psnr_pbn.safetensors

The patches are drawn from the data folder's training split the way training draws them (patch
size, foreground fraction and flips from the file's provenance), always the same ones for a seed.
The data must be prepared with the file's degradation. Training runs since `precise_bn` existed
do this themselves; this is for files trained before (see mrisr_cli/batchnorm.py).

``--check N`` then scores the input, the old file and the new one on N validation patches
centred on the head (PSNR of each patch's 58x34x58 core, the reference's min-max as range, as
`mrisr evaluate` scales); ``--score-only`` skips the recalibration and scores an existing --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from mrisr_cli.batchnorm import recalibrate_weights_file
from mrisr_cli.manifest import load_manifest
from mrisr_cli.metrics import normalise_pair, psnr
from mrisr_cli.patches import PatchOptions, PatchSampler, open_split
from mrisr_cli.weights import WeightsFile, load_weights

CORE_MARGIN = 3  # voxels cropped from each face of an output patch, as in inference


def patch_scores(
    weights: WeightsFile | None, lr: np.ndarray, hr: np.ndarray, batch_size: int
) -> list[float]:
    """PSNR of each patch's core (the input itself when ``weights`` is None)."""
    if weights is None:
        out = lr
    else:
        model = weights.build()
        with torch.inference_mode():
            out = np.concatenate(
                [
                    model(torch.from_numpy(lr[i : i + batch_size])).numpy()
                    for i in range(0, len(lr), batch_size)
                ]
            )
    core = (slice(CORE_MARGIN, -CORE_MARGIN),) * 3
    return [psnr(*normalise_pair(h[0][core], o[0][core])) for h, o in zip(hr, out, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `mrisr prepare` folder")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--check", type=int, default=0, help="validation patches scored after")
    parser.add_argument("--score-only", action="store_true", help="score an existing --out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = load_weights(args.weights)
    manifest = load_manifest(args.data)
    if weights.degradation.to_json() != manifest.degradation.to_json():
        print(
            f"{args.data}: prepared with another degradation than {args.weights}", file=sys.stderr
        )
        return 1
    config = weights.provenance.get("config", {})
    options = PatchOptions(
        patch=tuple(config.get("patch", PatchOptions.patch)),
        foreground_fraction=float(config.get("foreground_fraction", 0.9)),
        flip_axes=tuple(config.get("flip_axes", (0, 1, 2))),
    )
    sampler = PatchSampler(open_split(manifest, args.split), options, seed=args.seed)
    if not args.score_only:
        started = time.perf_counter()
        batches = recalibrate_weights_file(
            weights,
            sampler,
            args.out,
            patches=args.patches,
            batch_size=args.batch_size,
            device=args.device,
            overwrite=args.overwrite,
        )
        seconds = time.perf_counter() - started
        print(
            f"{args.out}: BatchNorm statistics from {batches} x {args.batch_size} patches of "
            f"{len(sampler.subjects)} {args.split} subjects in {seconds:.0f} s"
        )
    if args.check:
        # centred on the head: a patch of pure background has no PSNR (constant reference)
        head = replace(options, foreground_fraction=1.0)
        val = PatchSampler(open_split(manifest, "val"), head, seed=args.seed + 1)
        lr, hr = val.batch((0, 0), args.check)
        for label, source in (
            ("input", None),
            ("before", weights),
            ("after", load_weights(args.out)),
        ):
            scores = patch_scores(source, lr, hr, args.batch_size)
            print(
                f"{label:6s} mean PSNR {np.mean(scores):.2f} dB on {len(scores)} validation "
                f"patches: {' '.join(f'{v:.2f}' for v in scores)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
