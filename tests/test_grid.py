"""Putting inputs on the model's grid: 1 mm volumes untouched, coarse ones resampled, axes moved."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import head_phantom

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.degrade_file import degrade_file
from mrisr_cli.errors import InputError
from mrisr_cli.grid import plan_grid

CONFIG = DegradationConfig()


def affine_with(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def test_one_millimetre_volume_is_used_as_it_is() -> None:
    plan = plan_grid(affine_with((1.0, 1.0, 1.0)), (30, 20, 30), CONFIG)
    assert not plan.resampled and plan.permutation == (0, 1, 2) and not plan.warnings
    data = np.random.default_rng(0).random((30, 20, 30)).astype(np.float32)
    np.testing.assert_array_equal(plan.to_output(plan.to_model(data)), data)
    np.testing.assert_allclose(plan.output_affine(), affine_with((1.0, 1.0, 1.0)))


def test_coarse_degraded_axes_are_resampled_without_permutation() -> None:
    plan = plan_grid(affine_with((2.0, 1.0, 2.0)), (15, 20, 16), CONFIG)
    assert plan.coarse_axes == (0, 2) and plan.permutation == (0, 1, 2)
    assert plan.model_shape == (30, 20, 32)
    np.testing.assert_allclose(plan.model_spacing, (1.0, 1.0, 1.0))


def test_coarse_axis_that_the_model_does_not_degrade_is_moved_into_a_degraded_slot() -> None:
    plan = plan_grid(affine_with((1.0, 2.0, 1.0)), (30, 10, 30), CONFIG)
    assert plan.coarse_axes == (1,)
    assert plan.permutation == (1, 0, 2)  # coarse P-A axis goes where L-R was
    data = np.zeros(plan.model_shape, np.float32)
    assert plan.permute(data).shape == (20, 30, 30)
    np.testing.assert_array_equal(plan.unpermute(plan.permute(data)), data)


def test_reoriented_input_returns_to_its_own_axis_order() -> None:
    affine = np.array([[0, 0, -2.0, 10], [1.0, 0, 0, -5], [0, 2.0, 0, 3], [0, 0, 0, 1]])
    plan = plan_grid(affine, (20, 12, 15), CONFIG)
    # voxel axes: 0 -> A (1 mm), 1 -> S (2 mm), 2 -> L (2 mm): canonical coarse axes 0 and 2
    assert plan.coarse_axes == (0, 2)
    out = plan.to_output(np.zeros(plan.model_shape, np.float32))
    assert out.shape == (20, 24, 30)
    # the written file, put in canonical order, is exactly the model's 1 mm grid, whose first
    # voxel coincides with the input's first canonical voxel
    written = nib.Nifti1Image(out, plan.output_affine())
    canonical = nib.as_closest_canonical(written)
    np.testing.assert_allclose(canonical.affine, plan.model_affine, atol=1e-9)
    assert canonical.shape == plan.model_shape
    np.testing.assert_allclose(plan.model_affine[:, 3], plan.reorientation.canonical_affine[:, 3])
    np.testing.assert_allclose(nib.affines.voxel_sizes(plan.output_affine()), (1.0, 1.0, 1.0))
    assert nib.aff2axcodes(plan.output_affine()) == nib.aff2axcodes(affine)


def test_too_coarse_is_refused_and_odd_spacings_warn() -> None:
    with pytest.raises(InputError, match="coarser than") as refused:
        plan_grid(affine_with((1.0, 1.0, 3.0)), (30, 30, 10), CONFIG)
    assert "mrisr prepare --factor 3" in str(refused.value)  # the way on: a x3 model
    x3 = DegradationConfig(factor=3, axes=CONFIG.axes)  # which does take the scan
    assert plan_grid(affine_with((1.0, 1.0, 3.0)), (30, 30, 10), x3).resampled
    fine = plan_grid(affine_with((0.7, 0.7, 0.7)), (30, 30, 30), CONFIG)
    assert any("finer than" in w for w in fine.warnings)
    iso = plan_grid(affine_with((1.6, 1.6, 1.6)), (30, 30, 30), CONFIG)
    assert any("coarse along 3 axes" in w for w in iso.warnings)
    assert iso.model_shape == (48, 48, 48)


@pytest.mark.parametrize("shape", [(40, 44, 36), (41, 43, 37), (41, 42, 39)])
def test_plan_for_a_kept_lowres_file_is_the_grid_of_the_degraded_file(
    tmp_path: Path, shape: tuple[int, int, int]
) -> None:
    """`mrisr degrade --keep-lowres` writes the low-resolution volume in the input's axis order;
    the plan for it returns exactly the degraded file's grid (shape, affine, axis order)."""
    lia = np.array([[-1.0, 0, 0, 20], [0, 0, 1.0, -30], [0, -1.0, 0, 15], [0, 0, 0, 1]])
    hr = tmp_path / "hr.mgz"
    nib.save(nib.MGHImage(head_phantom(shape), lia), hr)
    degrade_file(hr, tmp_path / "lr.nii.gz", CONFIG, lowres_path=tmp_path / "low.nii.gz")
    low = nib.load(tmp_path / "low.nii.gz")
    assert nib.aff2axcodes(low.affine) == ("L", "I", "A")
    plan = plan_grid(low.affine, low.shape, CONFIG)
    assert plan.coarse_axes == (0, 2) and plan.permutation == (0, 1, 2)
    out = plan.to_output(np.zeros(plan.model_shape, np.float32))
    assert out.shape == shape
    np.testing.assert_allclose(plan.output_affine(), lia, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_a_true_lowres_volume_becomes_the_input_the_model_was_trained_on(
    tmp_path: Path, interpolation: str
) -> None:
    """The coarse grid is interpolated as the training degradation's last step was, with the
    model's own --interpolation: a cubic model was given linear interpolation (up to 2 z)."""
    config = DegradationConfig(interpolation=interpolation)
    save = tmp_path / "hr.nii.gz"
    nib.save(nib.Nifti1Image(head_phantom((40, 30, 40)), np.eye(4)), save)
    lr_path, low_path = tmp_path / "lr.nii.gz", tmp_path / "low.nii.gz"
    degrade_file(save, lr_path, config, lowres_path=low_path)
    low = nib.load(low_path)
    plan = plan_grid(low.affine, low.shape, config)
    assert plan.coarse_axes == (0, 2)
    trained_on = np.asarray(nib.load(lr_path).dataobj, dtype=np.float32)
    given = plan.to_model(np.asarray(low.dataobj, dtype=np.float32))
    np.testing.assert_allclose(given, trained_on, atol=1e-4 * float(np.abs(trained_on).max()))
