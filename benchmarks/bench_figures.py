"""The figures of docs/speed.md that need no run of the full network: geometry and small timings.

    python benchmarks/bench_figures.py                          # everything (about two minutes)
    python benchmarks/bench_figures.py --parts tiles            # tile counts only (no network)
    python benchmarks/bench_figures.py --parts networks,prepare,mask --threads 2

Parts:

- ``tiles``: on the 18 real 1 mm volumes ($MRISR_DATA or ../shared/data: ``t1/`` and
  ``pathological/``), the tiles of the default 64x40x64 grid (margin 3) that each rule runs, in
  two orientations: the arrays as stored, and the canonical axes that `mrisr upsample` tiles
  (``grid.plan_grid``). Rules: ``2x2x2`` (the code's rule, ``inference.plan_tiles``; the one run
  that every exactly constant tile reuses is counted apart), ``const`` (exactly constant tiles
  skipped only, the "before" path), ``>min`` (a voxel above the minimum in the tile's input),
  ``voxel`` (a voxel above a tenth of the way from the minimum to Otsu's threshold of the voxels)
  and two grids aligned to the bounding box of the ``voxel`` content (and of the ``2x2x2``
  content): ``edge`` puts a core boundary on the box's lower faces and spans the whole volume
  (the tiles below the box run for the 3 voxels of margin that reach into it), ``box`` tiles the
  box only (voxels outside it pass through). Also: the 99.9th percentile of the voxels that the
  skipped (passed-through) cores keep, over the median inside the foreground mask; and, on S06,
  the tiles of each tiling of ``bench_upsample.py --parts tiles``.
- ``networks``: parameters, MFLOP per output voxel (convolutions, exact), BatchNorms and the
  conv-BN pairs that ``fusion`` folds, for each generator; FSRCNN's last convolution's share; the
  FLOP ratio of the full RRDG to its one-RRDB proxy.
- ``prepare``: seconds to prepare the full RRDG's inference copy (trace, copy, folding), best of 3.
- ``mask``: ``intensity.foreground_mask`` against the rule before commit ab466cc (``ndi.label``
  of the whole volume, ``ndi.sum_labels``, ``ndi.binary_fill_holes``), best of 3 each, and
  whether the masks are identical, on S06, S16, S19, S02 and a synthetic 256^3 head in noisy air;
  the speed-up is the before seconds over the now seconds, both measured in this run.

``--threads`` goes to torch, ITK and OpenMP (``mrisr_cli.threads.configure_threads``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from bench_upsample import (
    TILINGS,
    conv_flops_per_voxel,
    data_dir,
    load_average,
    synthetic_head,
)
from scipy import ndimage as ndi
from torch import nn

from mrisr_cli import inference
from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.fusion import conv_bn_pairs
from mrisr_cli.grid import plan_grid
from mrisr_cli.inference import InferenceOptions, content_blocks, plan_tiles, prepare_network
from mrisr_cli.intensity import (
    bounding_box,
    foreground_mask,
    foreground_stats,
    foreground_threshold,
    otsu_threshold,
)
from mrisr_cli.networks import GENERATORS, NetworkConfig, build_network, count_parameters
from mrisr_cli.threads import configure_threads
from mrisr_cli.tiling import TileGrid, pad_for_grid, tiles_with_content
from mrisr_cli.volumes import load_volume

MASK_CASES = [
    "t1/S06_brainchop_t1_crop.nii.gz",
    "t1/S16_kevinaquino_T1.mgz",
    "t1/S19_NFBS_A00028185_brain.nii.gz",
    "t1/S02_otsu.nii.gz",
]


def volumes(folder: Path) -> list[Path]:
    return sorted((folder / "t1").iterdir()) + sorted((folder / "pathological").iterdir())


def oriented(path: Path, canonical: bool) -> np.ndarray:
    """The array as stored, or on the canonical axes that `mrisr upsample` tiles."""
    if not canonical:
        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)  # type: ignore[attr-defined]
    volume = load_volume(path)
    plan = plan_grid(volume.affine, volume.data.shape, DegradationConfig())  # type: ignore[arg-type]
    return plan.permute(plan.to_model(volume.data))


def block_content(volume: np.ndarray) -> np.ndarray:
    """The code's 2x2x2 content blocks, expanded back to voxels."""
    blocks = content_blocks(volume)
    b = inference.CONTENT_BLOCK
    full = blocks.repeat(b, 0).repeat(b, 1).repeat(b, 2)
    return full[: volume.shape[0], : volume.shape[1], : volume.shape[2]]


def aligned_count(content: np.ndarray, extend: bool) -> int:
    """Tiles whose input (core plus margin) touches ``content`` on a grid aligned to its box."""
    box = bounding_box(content)
    lo = [b.start for b in box]
    hi = [b.stop for b in box]
    core = TileGrid((1, 1, 1)).core
    if extend:  # the grid continues below the box, down to the volume's first voxel
        lo = [low - math.ceil(low / c) * c for low, c in zip(lo, core, strict=True)]
        hi = list(content.shape)
    grid = TileGrid(tuple(h - low for h, low in zip(hi, lo, strict=True)))  # type: ignore[arg-type]
    count = 0
    for start in grid.starts():
        source = tuple(
            slice(max(0, low + s - grid.margin), min(n, low + s - grid.margin + p))
            for low, s, p, n in zip(lo, start, grid.patch, content.shape, strict=True)
        )
        if all(s.stop > s.start for s in source) and bool(content[source].any()):
            count += 1
    return count


def passed_through_p999(volume: np.ndarray, grid: TileGrid, background: list) -> float | None:
    """99.9th percentile of the skipped cores' voxels over the foreground median (None: none)."""
    if not background:
        return None
    kept = np.concatenate(
        [
            volume[tuple(slice(s, s + c) for s, c in zip(start, grid.core, strict=True))].ravel()
            for start in background
        ]
    )
    tissue = float(np.median(volume[foreground_mask(volume)]))
    return float(np.percentile(kept, 99.9)) / tissue


def tiles_part(folder: Path) -> None:
    keys = ["grid", "2x2x2", "probe", "const", ">min", "voxel", "edge", "box", "edge2", "box2"]
    for canonical in (False, True):
        label = "canonical axes (as mrisr upsample tiles)" if canonical else "arrays as stored"
        print(f"\nTiles run at 64x40x64, margin 3, {label} ({load_average()})")
        print(f"{'volume':<40}" + "".join(f"{k:>7}" for k in keys) + "  p99.9 kept / tissue")
        totals = dict.fromkeys(keys, 0)
        for path in volumes(folder):
            volume = oriented(path, canonical)
            grid = TileGrid(volume.shape)  # type: ignore[arg-type]
            padded = pad_for_grid(volume, grid)
            new = plan_tiles(padded, grid, InferenceOptions())
            old = plan_tiles(padded, grid, InferenceOptions(skip_background=False))
            low = float(volume.min())
            voxel = volume > low + 0.1 * (otsu_threshold(volume) - low)
            blocks = block_content(volume)
            row = {
                "grid": len(grid),
                "2x2x2": len(new.run),
                "probe": int(bool(new.constant)),
                "const": len(old.run),
                ">min": sum(tiles_with_content(grid, volume > low)),
                "voxel": sum(tiles_with_content(grid, voxel)),
                "edge": aligned_count(voxel, extend=True),
                "box": aligned_count(voxel, extend=False),
                "edge2": aligned_count(blocks, extend=True),
                "box2": aligned_count(blocks, extend=False),
            }
            for key, value in row.items():
                totals[key] += value
            share = passed_through_p999(volume, grid, new.background)
            note = "" if share is None else f"  {100 * share:.1f}% ({len(new.background)} cores)"
            print(f"{path.name[:39]:<40}" + "".join(f"{row[k]:>7}" for k in keys) + note)
        print(f"{'total':<40}" + "".join(f"{totals[k]:>7}" for k in keys))
    s06 = folder / MASK_CASES[0]
    for canonical in (False, True):
        data = oriented(s06, canonical)
        normalised = foreground_stats(data, foreground_mask(data)).normalise(data)
        label = "canonical axes" if canonical else "as stored"
        print(f"\nS06 {normalised.shape}, {label}: tiles run (+ the constant probe) per tiling")
        for name, patch, margin, overlap in TILINGS:
            options = InferenceOptions(patch=patch, margin=margin, overlap=overlap)
            grid = TileGrid(normalised.shape, patch, margin, overlap)  # type: ignore[arg-type]
            plan = plan_tiles(pad_for_grid(normalised, grid), grid, options)
            print(
                f"  {name:<24}{len(plan.run) + bool(plan.constant):>5} of {len(grid):>4}"
                f"{plan.voxels_run / 1e6:>7.1f} Mvox"
            )
        low = float(data.min())
        above = int((data > low + 0.1 * (otsu_threshold(data) - low)).sum())
        head = int(foreground_mask(data).sum())
        print(
            f"  voxels above the per-voxel background threshold: {above / 1e6:.2f} M; "
            f"in the foreground mask: {head / 1e6:.2f} M"
        )


def networks_part() -> None:
    print("\nnetwork          parameters  MFLOP/voxel  BatchNorms  folded pairs")
    for name in GENERATORS:
        model = build_network(NetworkConfig(name)).eval()
        flops = conv_flops_per_voxel(model)
        norms = sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
        print(
            f"{name:<16}{count_parameters(model):>12,}{flops / 1e6:>13.3f}{norms:>12}"
            f"{len(conv_bn_pairs(model)):>14}"
        )
        if name == "fsrcnn":
            last = [m for m in model.modules() if isinstance(m, nn.Conv3d)][-1]
            share = 2 * last.in_channels * last.out_channels * math.prod(last.kernel_size) / flops
            print(f"  last conv {last.kernel_size}: {100 * share:.1f}% of the FLOPs")
    full = build_network(NetworkConfig("rrdg", {"features": 48, "blocks": 4, "growth": 12}))
    proxy = build_network(NetworkConfig("rrdg", {"features": 48, "blocks": 1, "growth": 12}))
    per_voxel = conv_flops_per_voxel(full)
    print(
        f"RRDG: {per_voxel * 64 * 40 * 64 / 1e12:.3f} TFLOP per 64x40x64 patch; "
        f"{per_voxel / conv_flops_per_voxel(proxy):.2f}x the FLOPs of the one-RRDB proxy"
    )


def best_of(repeats: int, call: Callable[[], object]) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def prepare_part() -> None:
    model = build_network(NetworkConfig("rrdg", {"features": 48, "blocks": 4, "growth": 12}))

    def prepare() -> None:
        inference._PREPARED.clear()  # time the preparation, not the cache
        prepare_network(model, InferenceOptions())

    print(
        f"\nprepare_network, full RRDG, best of 3: {best_of(3, prepare):.2f} s ({load_average()})"
    )


def mask_before_ab466cc(data: np.ndarray) -> np.ndarray:
    """``intensity.foreground_mask`` as it was before commit ab466cc (the same rule)."""
    threshold = foreground_threshold(data)  # the threshold is the same; the labelling is not
    if threshold is None:
        return np.zeros(data.shape, dtype=bool)
    mask = data > threshold
    labels, count = ndi.label(mask)
    if count > 1:
        sizes = ndi.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    return ndi.binary_fill_holes(mask)  # type: ignore[return-value]


def mask_part(folder: Path | None) -> None:
    cases: list[tuple[str, np.ndarray]] = []
    for name in MASK_CASES if folder is not None else []:
        data = np.asarray(nib.load(str(folder / name)).dataobj, dtype=np.float32)  # type: ignore[attr-defined, operator]
        cases.append((Path(name).name.split("_")[0], data))
    cases.append(("synthetic 256^3", synthetic_head((256, 256, 256))))
    print(f"\nforeground_mask, best of 3 ({load_average()})")
    print(f"{'volume':<18}{'before s':>9}{'now s':>7}{'speed-up':>10}  identical")
    for label, data in cases:
        before = best_of(3, lambda d=data: mask_before_ab466cc(d))
        now = best_of(3, lambda d=data: foreground_mask(d))
        same = bool(np.array_equal(mask_before_ab466cc(data), foreground_mask(data)))
        print(f"{label:<18}{before:>9.2f}{now:>7.2f}{before / now:>9.2f}x  {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tiles,networks,prepare,mask", help="which parts")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch, ITK and OpenMP threads [torch's]"
    )
    args = parser.parse_args()
    if args.threads:
        configure_threads(args.threads)
    parts = set(args.parts.split(","))
    folder = data_dir()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {folder}")
    if "tiles" in parts:
        if folder is None:
            print("tiles: no data folder ($MRISR_DATA or ../shared/data); skipped")
        else:
            tiles_part(folder)
    if "networks" in parts:
        networks_part()
    if "prepare" in parts:
        prepare_part()
    if "mask" in parts:
        mask_part(folder)


if __name__ == "__main__":
    main()
