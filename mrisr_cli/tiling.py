"""Tiling a volume into overlapping network patches and stitching their cropped cores.

Pure functions over index grids (no network, no I/O) so they can be tested with an identity
network on odd shapes and on volumes smaller than one patch. The paper's scheme: 64x40x64
patches, 3 voxels cropped from every face of each output patch (a 58x34x58 core), cores tiled
without overlap; the volume is edge-padded so that every voxel falls in exactly one core.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

PAPER_PATCH: tuple[int, int, int] = (64, 40, 64)
PAPER_MARGIN: int = 3


@dataclass(frozen=True)
class TileGrid:
    """Where the patches of one volume lie, in the coordinates of the padded volume."""

    shape: tuple[int, int, int]
    patch: tuple[int, int, int] = PAPER_PATCH
    margin: int = PAPER_MARGIN

    def __post_init__(self) -> None:
        if any(p <= 2 * self.margin for p in self.patch):
            raise ValueError(f"patch {self.patch} must exceed twice the margin {self.margin}")

    @property
    def core(self) -> tuple[int, int, int]:
        return tuple(p - 2 * self.margin for p in self.patch)  # type: ignore[return-value]

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(math.ceil(n / c) for n, c in zip(self.shape, self.core, strict=True))  # type: ignore[return-value]

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(k * c + 2 * self.margin for k, c in zip(self.counts, self.core, strict=True))  # type: ignore[return-value]

    def __len__(self) -> int:
        return math.prod(self.counts)

    def starts(self) -> Iterator[tuple[int, int, int]]:
        """Patch origins in the padded volume (= core origins in the unpadded volume)."""
        for i in range(self.counts[0]):
            for j in range(self.counts[1]):
                for k in range(self.counts[2]):
                    yield (i * self.core[0], j * self.core[1], k * self.core[2])

    def patch_slices(self, start: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))  # type: ignore[return-value]

    def core_slices(self, start: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + c) for s, c in zip(start, self.core, strict=True))  # type: ignore[return-value]


def pad_for_grid(volume: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Edge-pad so every patch of ``grid`` lies inside (margin before, the rest after)."""
    pads = [
        (grid.margin, total - n - grid.margin)
        for n, total in zip(volume.shape, grid.padded_shape, strict=True)
    ]
    return np.pad(volume, pads, mode="edge")


def crop_core(patch_output: np.ndarray, margin: int) -> np.ndarray:
    """Drop ``margin`` voxels from every face of the last three axes."""
    m = margin
    return patch_output[..., m:-m, m:-m, m:-m] if m else patch_output


def empty_canvas(grid: TileGrid) -> np.ndarray:
    """Output array covering all cores; cropped to ``grid.shape`` by :func:`finish_canvas`."""
    full = tuple(k * c for k, c in zip(grid.counts, grid.core, strict=True))
    return np.zeros(full, dtype=np.float32)


def finish_canvas(canvas: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Remove the padding that lay beyond the volume."""
    n0, n1, n2 = grid.shape
    return np.ascontiguousarray(canvas[:n0, :n1, :n2])
