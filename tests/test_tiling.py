"""Tiling and stitching: every voxel comes from exactly one cropped patch core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_RRDG, head_phantom
from torch import nn

from mrisr_cli.inference import InferenceOptions, super_resolve
from mrisr_cli.networks import build_network
from mrisr_cli.tiling import (
    TileGrid,
    crop_core,
    kept_share,
    pad_for_grid,
    slow_tiling_warning,
)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class Shift(nn.Module):
    """Not translation-invariant near patch borders: exposes any misplaced core."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, shifts=1, dims=2)


@pytest.mark.parametrize(
    "shape", [(64, 40, 64), (65, 41, 63), (7, 5, 9), (130, 35, 59), (58, 34, 58)]
)
def test_identity_network_reproduces_the_volume(shape: tuple[int, int, int]) -> None:
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    out = super_resolve(volume, Identity(), InferenceOptions(batch_size=3))
    assert out.shape == shape
    np.testing.assert_array_equal(out, volume)


def test_grid_covers_every_voxel_once() -> None:
    grid = TileGrid((130, 35, 59))
    assert grid.core == (58, 34, 58)
    assert grid.counts == (3, 2, 2)
    cover = np.zeros(tuple(k * c for k, c in zip(grid.counts, grid.core, strict=True)), int)
    for start in grid.starts():
        cover[grid.core_slices(start)] += 1
    assert (cover == 1).all()
    padded = pad_for_grid(np.zeros(grid.shape, np.float32), grid)
    assert padded.shape == grid.padded_shape
    for start in grid.starts():
        assert padded[grid.patch_slices(start)].shape == (64, 40, 64)


def test_margin_is_cropped_from_every_face() -> None:
    patch = np.arange(64 * 40 * 64, dtype=np.float32).reshape(64, 40, 64)
    np.testing.assert_array_equal(crop_core(patch, 3), patch[3:61, 3:37, 3:61])


def test_shift_network_stitches_cores_in_place() -> None:
    volume = np.random.default_rng(1).random((70, 45, 66)).astype(np.float32)
    out = super_resolve(volume, Shift(), InferenceOptions(batch_size=2))
    # inside every core the shift by one voxel along axis 0 is visible everywhere but the edge
    np.testing.assert_array_equal(out[1:], volume[:-1])


def _patch_by_patch(volume: np.ndarray, model: nn.Module, grid: TileGrid) -> np.ndarray:
    """The straightforward path: pad, run each patch alone, crop, place."""
    padded = pad_for_grid(volume, grid)
    out = np.zeros(grid.padded_shape, np.float32)
    with torch.no_grad():
        for start in grid.starts():
            patch = torch.from_numpy(padded[grid.patch_slices(start)].copy())[None, None]
            result = model(patch)[0, 0].numpy()
            out[grid.core_slices(start)] = crop_core(result, grid.margin)
    return out[: volume.shape[0], : volume.shape[1], : volume.shape[2]]


def test_stitched_equals_patch_by_patch_for_a_real_network() -> None:
    torch.manual_seed(0)
    model = build_network(TINY_RRDG).eval()
    volume = head_phantom((44, 40, 44))
    volume = (volume - volume.mean()) / volume.std()
    # small patches: 2 x 3 x 2 tiles with odd remainders, at a fraction of the paper's cost
    options = InferenceOptions(patch=(30, 20, 30), batch_size=5)
    stitched = super_resolve(volume, model, options)
    reference = _patch_by_patch(volume, model, TileGrid(volume.shape, (30, 20, 30)))
    assert np.abs(stitched - reference).max() < 1e-5


def test_skipping_constant_background_patches_changes_nothing() -> None:
    torch.manual_seed(0)
    model = build_network(TINY_RRDG).eval()
    volume = np.zeros((60, 40, 64), np.float32)  # 3 x 3 x 3 tiles, most pure background
    volume[30:50, 5:25, 10:40] = head_phantom((20, 20, 30))
    volume = (volume - volume.mean()) / volume.std()  # as the pipeline feeds the network
    patch = (26, 20, 28)
    skipped = super_resolve(volume, model, InferenceOptions(patch=patch, skip_constant=True))
    full = super_resolve(volume, model, InferenceOptions(patch=patch, skip_constant=False))
    assert np.abs(skipped - full).max() < 1e-5


def test_stitched_equals_patch_by_patch_on_a_real_t1_crop_with_paper_patches() -> None:
    """The must-show figure: 64x40x64 patches, 3-voxel crop, on real anatomy."""
    import nibabel as nib
    from conftest import TINY_FAST, real_volume

    path = real_volume("t1/S08_stroke_T1.nii.gz")
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)[20:90, 40:110, 30:100]
    volume = (data - data.mean()) / data.std()
    torch.manual_seed(0)
    model = build_network(TINY_FAST).eval()
    stitched = super_resolve(volume, model, InferenceOptions(batch_size=4))
    reference = _patch_by_patch(volume, model, TileGrid(volume.shape))
    difference = float(np.abs(stitched - reference).max())
    print(f"stitched vs patch-by-patch, real T1 crop {volume.shape}: max abs diff {difference:.2e}")
    assert difference < 1e-5


def test_tilings_that_crop_most_of_each_patch_are_called_slow() -> None:
    """The share kept is the stride's volume over the patch's; the documented alternatives
    (--margin 6, --overlap 8) pass; a 10-voxel patch, keeping 4 of 10 voxels per axis, does not."""
    assert kept_share((64, 40, 64), 3) == pytest.approx(58 * 34 * 58 / (64 * 40 * 64))
    assert kept_share((64, 40, 64), 3, overlap=8) == pytest.approx(50 * 26 * 50 / (64 * 40 * 64))
    for patch, margin, overlap in [
        ((64, 40, 64), 3, 0),
        ((64, 40, 64), 6, 0),
        ((64, 40, 64), 3, 8),
    ]:
        assert slow_tiling_warning(patch, margin, overlap) is None
    warning = slow_tiling_warning((10, 10, 10), 3)
    assert warning is not None and "keeps 6% of each patch" in warning
    assert "about 11x the network time" in warning
