"""N4 (ANTsPy) keeps the scan's units whatever they are, and removes a smooth field."""

from __future__ import annotations

import numpy as np
import pytest

from mrisr_cli.n4 import N4_RANGE, n4_correct, n4_fit
from tests.test_prepare import SHAPE, head

SPACING = (1.0, 1.0, 1.0)


def biased_head() -> tuple[np.ndarray, np.ndarray]:
    """A head and the same head under a smooth field (0.75 to 1.25 along the first axis)."""
    clean = head(0)
    field = np.linspace(0.75, 1.25, SHAPE[0], dtype=np.float32)[:, None, None]
    return clean, clean * field


@pytest.fixture(scope="module")
def unit_correction() -> np.ndarray:
    """N4 of the biased head in its own units (0 to ~180): computed once, the reference."""
    return n4_correct(biased_head()[1], SPACING)


def check_keeps_units_and_flattens(
    clean: np.ndarray, biased: np.ndarray, fixed: np.ndarray
) -> None:
    """A [0, 1] scan once came back negative and inverted (a "+1" shift dominated it)."""
    inside = clean > 120  # the flat innermost shell
    assert fixed.min() > -0.02 * biased.max()
    assert abs(fixed.mean() / biased.mean() - 1.0) < 0.05
    assert np.corrcoef(fixed.ravel(), biased.ravel())[0, 1] > 0.95
    spread = lambda v: float(v[inside].std() / v[inside].mean())  # noqa: E731
    print(f"within-tissue spread {spread(biased):.3f} -> {spread(fixed):.3f}")
    assert spread(fixed) < 0.85 * spread(biased)


def test_n4_keeps_units_and_flattens_a_field(unit_correction: np.ndarray) -> None:
    clean, biased = biased_head()
    check_keeps_units_and_flattens(clean, biased, unit_correction)


@pytest.mark.parametrize("units", [1.0 / 255.0, 40.0])
def test_n4_gives_the_same_correction_in_any_units(
    units: float, unit_correction: np.ndarray
) -> None:
    """The scan in [0, ~0.7] (1/255) or [0, ~7100] (x40): the correction of the scan in its own
    units, scaled."""
    clean, biased = biased_head()
    fixed = n4_correct(biased * units, SPACING)
    check_keeps_units_and_flattens(clean, biased * units, fixed)
    assert np.abs(fixed / units - unit_correction).max() < 0.01 * unit_correction.max()


@pytest.mark.parametrize("span", [1e-30, 3e38])
def test_n4_is_computed_where_float32_would_fail(span: float) -> None:
    """A float32 volume spanning +-1.5e38 overflowed in the shift; one spanning 1e-30 was rounded
    to a constant and came back as zeros."""
    clean = head(0).astype(np.float64)
    volume = (clean / clean.max() * span - span / 2).astype(np.float32)
    fixed = n4_correct(volume, (1.0, 1.0, 1.0))
    assert np.isfinite(fixed).all()
    assert np.corrcoef(fixed.ravel().astype(np.float64), volume.ravel())[0, 1] > 0.95


def test_n4_of_a_constant_image_is_the_image() -> None:
    np.testing.assert_array_equal(n4_correct(np.full((8, 8, 8), 5.0), (1.0, 1.0, 1.0)), 5.0)


def test_the_fitted_field_follows_the_bias_and_restores_it() -> None:
    """upsample removes N4's field before the network and puts it back after: the field must be
    the bias that was applied, and putting it back must give the biased input again."""
    clean, biased = biased_head()
    fit = n4_fit(biased, SPACING)
    np.testing.assert_allclose(fit.restore(fit.remove(biased)), biased, rtol=1e-5, atol=1e-3)
    # the field rises along the first axis: upper half / lower half of the head, 1.19 applied
    head_mask = clean > 20
    applied = np.linspace(0.75, 1.25, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    upper, lower = head_mask & (applied > 1), head_mask & (applied < 1)
    rise = lambda v: float(v[upper].mean() / v[lower].mean())  # noqa: E731
    gain = np.broadcast_to(fit.gain, SHAPE)
    print(f"rise of the field: applied {rise(applied):.3f}, fitted {rise(gain):.3f}")
    assert rise(gain) > 1.1 and abs(rise(gain) / rise(applied) - 1.0) < 0.05
    # a result made from the corrected head gets the input's shading back, not a flat one
    shading = np.where(head_mask, fit.restore(clean) / np.maximum(clean, 1.0), 0.0)
    assert abs(rise(shading) - rise(gain)) < 0.02


def test_n4_correct_is_the_image_ants_corrects(unit_correction: np.ndarray) -> None:
    """n4_correct divides by the field ANTs returns; ANTs's own corrected image, moved back to the
    input's units as mrisr did before it kept the field, must be the same. (``unit_correction``
    is n4_correct of this very biased head, computed once for the module.)"""
    import ants

    _, biased = biased_head()
    floor, span = float(biased.min()), float(biased.max() - biased.min())
    scale = N4_RANGE / span
    shifted = ((biased.astype(np.float64) - floor) * scale + 1.0).astype(np.float32)
    image = ants.from_numpy(shifted, spacing=SPACING)
    corrected = ants.n4_bias_field_correction(image).numpy().astype(np.float64)
    corrected *= shifted.mean(dtype=np.float64) / corrected.mean()
    expected = (corrected - 1.0) / scale + floor
    np.testing.assert_allclose(unit_correction, expected, atol=1e-5 * span)
