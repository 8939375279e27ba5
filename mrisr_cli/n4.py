"""N4 bias-field correction through ANTsPy (Tustison et al. 2010).

ANTsPy is imported lazily: it is heavy and only needed when N4 is asked for.

The shrink factor and convergence settings are ANTsPy's defaults (shrink 4, 4 levels of 50
iterations, tolerance 1e-7): no faster setting kept the corrected image within 1% of theirs
(``benchmarks/bench_upsample.py --parts n4``, figures in docs/speed.md), and the training data
were prepared with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mrisr_cli.errors import MrisrError

#: The intensity span N4 sees (the volume is rescaled to [1, 1 + N4_RANGE] and back).
N4_RANGE = 1000.0
#: Shrink factor of the image N4 fits its B-spline field on.
N4_SHRINK = 4
#: Iterations per fitting level and the convergence tolerance.
N4_CONVERGENCE: dict[str, Any] = {"iters": [50, 50, 50, 50], "tol": 1e-7}


def n4_correct(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    mask: np.ndarray | None = None,
    shrink_factor: int = N4_SHRINK,
    convergence: dict[str, Any] | None = None,
) -> np.ndarray:
    """Return the bias-corrected volume (same shape, float32, same units on average)."""
    try:
        import ants
    except ImportError as exc:  # pragma: no cover - antspyx is a declared dependency
        raise MrisrError("N4 needs ANTsPy: pip install antspyx (or run with --no-n4)") from exc
    # N4 models a multiplicative field on positive intensities. The volume is moved to
    # [1, 1 + N4_RANGE] first, whatever its units: a bare "+1" shift of a scan stored in [0, 1]
    # made the offset dominate, and N4 returned a negative, inverted image (seen on a real one).
    # in float64: a float32 volume spanning +-3e38 would overflow in float32, and one spanning
    # 1e-30 would be rounded away
    values = np.asarray(data, dtype=np.float64)
    floor = float(values.min())
    span = float(values.max()) - floor
    if span <= 0:  # a constant image has no field to correct
        return np.array(data, dtype=np.float32)
    scale = N4_RANGE / span
    shifted = np.ascontiguousarray((values - floor) * scale + 1.0, dtype=np.float32)
    image = ants.from_numpy(shifted, spacing=tuple(float(s) for s in spacing))
    ants_mask = None
    if mask is not None:
        ants_mask = ants.from_numpy(mask.astype(np.float32), spacing=image.spacing)
    corrected = ants.n4_bias_field_correction(
        image,
        mask=ants_mask,
        shrink_factor=shrink_factor,
        convergence=dict(convergence or N4_CONVERGENCE),
    )
    fixed = corrected.numpy().astype(np.float64)
    # the field is known up to a constant factor: keep the input's overall level (its units)
    fixed *= float(shifted.mean(dtype=np.float64)) / max(float(fixed.mean()), 1e-12)
    return ((fixed - 1.0) / scale + floor).astype(np.float32)
