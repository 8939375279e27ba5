"""Running a generator over a whole (normalised) volume, patch batch by patch batch.

Patches whose padded input is one constant value (the exact-zero background of skull-stripped
scans) all give the same network output, so it is computed once and reused: the result is
identical to running every patch, only faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mrisr_cli.errors import DeviceError
from mrisr_cli.tiling import (
    PAPER_MARGIN,
    PAPER_PATCH,
    TileGrid,
    crop_core,
    empty_canvas,
    finish_canvas,
    pad_for_grid,
)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the network: tiling, batching, device and precision."""

    patch: tuple[int, int, int] = PAPER_PATCH
    margin: int = PAPER_MARGIN
    batch_size: int = 4
    device: str = "cpu"
    half: bool = False
    skip_constant: bool = True


def resolve_device(name: str) -> str:
    """'auto' picks CUDA when torch sees a GPU (honouring CUDA_VISIBLE_DEVICES), else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but no CUDA GPU is available")
        return name
    if name != "cpu":
        raise DeviceError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return name


def autocast_context(device: str, half: bool) -> contextlib.AbstractContextManager[None]:
    """fp16 autocast on CUDA, bf16 on CPU, or nothing."""
    if not half:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _batches(items: list[tuple[int, int, int]], size: int) -> Iterator[list[tuple[int, int, int]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.inference_mode()
def run_network(model: nn.Module, patches: np.ndarray, options: InferenceOptions) -> np.ndarray:
    """Network output for a batch of patches shaped (B, X, Y, Z); float32 numpy out."""
    tensor = torch.from_numpy(np.ascontiguousarray(patches)).unsqueeze(1).to(options.device)
    try:
        with autocast_context(options.device, options.half):
            out = model(tensor)
    except torch.OutOfMemoryError as exc:
        raise DeviceError(
            f"out of GPU memory with --batch-size {options.batch_size}; try a smaller one"
        ) from exc
    return out.squeeze(1).float().cpu().numpy()


def super_resolve(
    volume: np.ndarray,
    model: nn.Module,
    options: InferenceOptions | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Tile, run, crop and stitch: the network's output for the whole volume (same shape)."""
    options = options or InferenceOptions()
    grid = TileGrid(tuple(volume.shape), options.patch, options.margin)  # type: ignore[arg-type]
    padded = pad_for_grid(volume.astype(np.float32), grid)
    canvas = empty_canvas(grid)
    starts = list(grid.starts())
    constant_value: float | None = None
    constant_output: np.ndarray | None = None
    to_run: list[tuple[int, int, int]] = []
    constant: list[tuple[int, int, int]] = []
    for start in starts:
        patch = padded[grid.patch_slices(start)]
        first = float(patch.flat[0])
        is_const = options.skip_constant and bool((patch == first).all())
        if is_const and (constant_value is None or first == constant_value):
            constant_value = first
            constant.append(start)
        else:
            to_run.append(start)
    done = 0
    model.eval()
    if constant:
        probe = padded[grid.patch_slices(constant[0])][None]
        constant_output = crop_core(run_network(model, probe, options)[0], grid.margin)
        for start in constant:
            canvas[grid.core_slices(start)] = constant_output
        done += len(constant)
        if progress:
            progress(done, len(starts))
    for batch in _batches(to_run, max(1, options.batch_size)):
        patches = np.stack([padded[grid.patch_slices(s)] for s in batch])
        outputs = crop_core(run_network(model, patches, options), grid.margin)
        for start, out in zip(batch, outputs, strict=True):
            canvas[grid.core_slices(start)] = out
        done += len(batch)
        if progress:
            progress(done, len(starts))
    return finish_canvas(canvas, grid)
