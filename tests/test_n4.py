"""N4 (ANTsPy) keeps the scan's units whatever they are, and removes a smooth field."""

from __future__ import annotations

import numpy as np
import pytest

from mrisr_cli.n4 import n4_correct
from tests.test_prepare import SHAPE, head


@pytest.mark.parametrize("units", [1.0 / 255.0, 1.0, 40.0])
def test_n4_keeps_units_and_flattens_a_field(units: float) -> None:
    """A [0, 1] scan once came back negative and inverted (a "+1" shift dominated it)."""
    clean = head(0)
    field = np.linspace(0.75, 1.25, SHAPE[0], dtype=np.float32)[:, None, None]
    biased = clean * field * units
    fixed = n4_correct(biased, (1.0, 1.0, 1.0))
    inside = clean > 120  # the flat innermost shell
    assert fixed.min() > -0.02 * biased.max()
    assert abs(fixed.mean() / biased.mean() - 1.0) < 0.05
    assert np.corrcoef(fixed.ravel(), biased.ravel())[0, 1] > 0.95
    spread = lambda v: float(v[inside].std() / v[inside].mean())  # noqa: E731
    print(f"units x{units:g}: within-tissue spread {spread(biased):.3f} -> {spread(fixed):.3f}")
    assert spread(fixed) < 0.85 * spread(biased)
    # the same correction in any units
    reference = n4_correct(clean * field, (1.0, 1.0, 1.0))
    assert np.abs(fixed / units - reference).max() < 0.01 * reference.max()


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
