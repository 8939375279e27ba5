"""N4 bias-field correction through ANTsPy (Tustison et al. 2010).

ANTsPy is imported lazily: it is heavy and only needed when N4 is asked for.

The shrink factor and convergence settings are ANTsPy's defaults (shrink 4, 4 levels of 50
iterations, tolerance 1e-7): no setting several times faster kept the corrected image within 1%
of theirs, and a looser tolerance is no faster, since the iteration limit is always reached
(``benchmarks/bench_upsample.py --parts n4``, figures in docs/speed.md); and the training data
were prepared with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mrisr_cli.errors import MrisrError

#: The intensity span N4 sees (the volume is rescaled to [1, 1 + N4_RANGE] and back).
N4_RANGE = 1000.0
#: Shrink factor of the image N4 fits its B-spline field on.
N4_SHRINK = 4
#: Iterations per fitting level and the convergence tolerance.
N4_CONVERGENCE: dict[str, Any] = {"iters": [50, 50, 50, 50], "tol": 1e-7}


@dataclass(frozen=True, eq=False)  # arrays: no meaningful == or hash
class BiasField:
    """A fitted N4 field: removed from the volume it was fitted on, and put back into a result on
    the same grid (``mrisr upsample`` feeds the network corrected intensities, as it was trained,
    and gives back the input's shading unless asked for the corrected image).

    N4 divides by a smooth field on positive intensities, so both directions work on the volume
    moved to [1, 1 + N4_RANGE] (``(x - floor) * scale + 1``): ``remove`` divides by ``gain`` there,
    ``restore`` multiplies, and ``restore(remove(x)) == x`` up to rounding.
    """

    gain: np.ndarray  # > 0, float32; N4's field over the ratio that keeps the input's level
    floor: float
    scale: float

    def _shifted(self, data: np.ndarray) -> np.ndarray:
        return (np.asarray(data, dtype=np.float64) - self.floor) * self.scale + 1.0

    def _unshifted(self, shifted: np.ndarray) -> np.ndarray:
        return ((shifted - 1.0) / self.scale + self.floor).astype(np.float32)

    def remove(self, data: np.ndarray) -> np.ndarray:
        """The bias-corrected volume (float32, the input's units on average)."""
        return self._unshifted(self._shifted(data) / self.gain)

    def restore(self, data: np.ndarray) -> np.ndarray:
        """A corrected volume (or a result made from one) with the field put back (float32)."""
        return self._unshifted(self._shifted(data) * self.gain)


def n4_fit(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    mask: np.ndarray | None = None,
    shrink_factor: int = N4_SHRINK,
    convergence: dict[str, Any] | None = None,
) -> BiasField:
    """Fit N4's bias field to ``data`` (its :meth:`BiasField.remove` is :func:`n4_correct`)."""
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
        return BiasField(gain=np.ones((), dtype=np.float32), floor=floor, scale=1.0)
    scale = N4_RANGE / span
    shifted = np.ascontiguousarray((values - floor) * scale + 1.0, dtype=np.float32)
    image = ants.from_numpy(shifted, spacing=tuple(float(s) for s in spacing))
    ants_mask = None
    if mask is not None:
        ants_mask = ants.from_numpy(mask.astype(np.float32), spacing=image.spacing)
    # ANTs writes the corrected image as the input divided by this field (checked: identical)
    field = ants.n4_bias_field_correction(
        image,
        mask=ants_mask,
        shrink_factor=shrink_factor,
        convergence=dict(convergence or N4_CONVERGENCE),
        return_bias_field=True,
    ).numpy()
    # the field is known up to a constant factor: keep the input's overall level (its units)
    corrected_mean = float((shifted / field).mean(dtype=np.float64))
    level = float(shifted.mean(dtype=np.float64)) / max(corrected_mean, 1e-12)
    # float32 (held while the network runs: 4 bytes a voxel); its rounding, 6e-8, is far below
    # the network's error
    return BiasField(gain=(field / np.float32(level)).astype(np.float32), floor=floor, scale=scale)


def n4_correct(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    mask: np.ndarray | None = None,
    shrink_factor: int = N4_SHRINK,
    convergence: dict[str, Any] | None = None,
) -> np.ndarray:
    """Return the bias-corrected volume (same shape, float32, same units on average)."""
    field = n4_fit(data, spacing, mask=mask, shrink_factor=shrink_factor, convergence=convergence)
    return field.remove(data)
