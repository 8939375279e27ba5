"""Tiling a volume into overlapping network patches and stitching their cropped cores.

Pure functions over index grids (no network, no I/O) so they can be tested with an identity
network on odd shapes and on volumes smaller than one patch. The paper's scheme: 64x40x64
patches, 3 voxels cropped from every face of each output patch (a 58x34x58 core), cores tiled
without overlap; the volume is edge-padded so that every voxel falls in exactly one core.

Beyond the paper, neighbouring cores may share ``overlap`` voxels per axis; there the outputs are
blended with linear ramps (weights summing to one), which hides the seams between tiles at the
cost of running more of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

PAPER_PATCH: tuple[int, int, int] = (64, 40, 64)
PAPER_MARGIN: int = 3
#: Tilings that keep less than this share of what the paper's keeps of each network run get a
#: warning: they are legal, only slow (``--patch 10,10,10`` keeps 6 % against 70 %).
SLOW_TILING_SHARE: float = 0.5


def kept_share(patch: tuple[int, int, int], margin: int, overlap: int = 0) -> float:
    """The share of each patch's voxels that tiling keeps (its stride's volume over the patch's):
    the network's time per volume goes with its inverse."""
    return math.prod(p - 2 * margin - overlap for p in patch) / math.prod(patch)


def slow_tiling_warning(patch: tuple[int, int, int], margin: int, overlap: int = 0) -> str | None:
    """A line for a tiling that spends the network's time on voxels it crops away, else None."""
    kept, paper = kept_share(patch, margin, overlap), kept_share(PAPER_PATCH, PAPER_MARGIN)
    if kept >= SLOW_TILING_SHARE * paper:
        return None
    shape = ",".join(map(str, patch))
    return (
        f"--patch {shape} with --margin {margin} and --overlap {overlap} keeps {kept:.0%} of "
        f"each patch (the paper's {','.join(map(str, PAPER_PATCH))} keeps {paper:.0%}): "
        f"expect about {paper / kept:.0f}x the network time"
    )


@dataclass(frozen=True)
class TileGrid:
    """Where the patches of one volume lie, in the coordinates of the padded volume."""

    shape: tuple[int, int, int]
    patch: tuple[int, int, int] = PAPER_PATCH
    margin: int = PAPER_MARGIN
    overlap: int = 0

    def __post_init__(self) -> None:
        if any(p <= 2 * self.margin for p in self.patch):
            raise ValueError(f"patch {self.patch} must exceed twice the margin {self.margin}")
        if self.overlap < 0 or any(self.overlap >= c for c in self.core):
            raise ValueError(f"overlap {self.overlap} must be >= 0 and below the core {self.core}")

    @property
    def core(self) -> tuple[int, int, int]:
        return tuple(p - 2 * self.margin for p in self.patch)  # type: ignore[return-value]

    @property
    def stride(self) -> tuple[int, int, int]:
        """Distance between neighbouring patch origins (the core less the overlap)."""
        return tuple(c - self.overlap for c in self.core)  # type: ignore[return-value]

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            max(1, math.ceil((n - self.overlap) / s))
            for n, s in zip(self.shape, self.stride, strict=True)
        )

    @property
    def covered_shape(self) -> tuple[int, int, int]:
        """The region the cores cover (at least ``shape``), in unpadded coordinates."""
        return tuple(  # type: ignore[return-value]
            (k - 1) * s + c for k, s, c in zip(self.counts, self.stride, self.core, strict=True)
        )

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(n + 2 * self.margin for n in self.covered_shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return math.prod(self.counts)

    def starts(self) -> Iterator[tuple[int, int, int]]:
        """Patch origins in the padded volume (= core origins in the unpadded volume)."""
        for i in range(self.counts[0]):
            for j in range(self.counts[1]):
                for k in range(self.counts[2]):
                    yield (i * self.stride[0], j * self.stride[1], k * self.stride[2])

    def patch_slices(self, start: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + p) for s, p in zip(start, self.patch, strict=True))  # type: ignore[return-value]

    def core_slices(self, start: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + c) for s, c in zip(start, self.core, strict=True))  # type: ignore[return-value]

    def source_slices(self, start: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        """The voxels of the unpadded volume that a patch reads (edge padding repeats them)."""
        return tuple(  # type: ignore[return-value]
            slice(max(0, s - self.margin), min(n, s - self.margin + p))
            for s, p, n in zip(start, self.patch, self.shape, strict=True)
        )


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
    return np.zeros(grid.covered_shape, dtype=np.float32)


def finish_canvas(canvas: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Remove the padding that lay beyond the volume."""
    n0, n1, n2 = grid.shape
    return np.ascontiguousarray(canvas[:n0, :n1, :n2])


def blend_window(grid: TileGrid) -> np.ndarray:
    """Weights of one core for overlapping tiles: linear ramps over ``overlap`` voxels per face.

    Ramps of neighbours are complementary (they sum to one inside an overlap); every weight is
    positive, so dividing by the summed weights also handles the volume's outer faces.
    """
    if grid.overlap == 0:
        return np.ones(grid.core, dtype=np.float32)
    axes = []
    for c in grid.core:
        i = np.arange(c, dtype=np.float64) + 0.5
        axes.append(np.minimum(1.0, np.minimum(i, c - i) / grid.overlap))
    window = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return window.astype(np.float32)


def tiles_with_content(grid: TileGrid, content: np.ndarray, block: int = 1) -> list[bool]:
    """For each patch (in :meth:`TileGrid.starts` order): does its input touch a content block?

    ``content`` is a mask over ``block``-sized cubes of the volume (the last ones may be partial).
    """
    expected = tuple(math.ceil(n / block) for n in grid.shape)
    if content.shape != expected:
        raise ValueError(f"content mask {content.shape} does not match the grid ({expected})")
    found = []
    for start in grid.starts():
        where = tuple(
            slice(s.start // block, math.ceil(s.stop / block)) for s in grid.source_slices(start)
        )
        found.append(bool(content[where].any()))
    return found
