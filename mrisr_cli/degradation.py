"""The k-space degradation that makes low-resolution training inputs, and the grid step that
puts any low-resolution volume onto the model's high-resolution grid.

Procedure (Chen et al. 2018, the MRDB authors' ``preprocess_downsample.py``; written anew):

1. ``K = fftshift(fftn(hr))``.
2. Boost: multiply ``K`` by an *inverse* Hann window on every axis (window length
   ``unfilter_window x n``, centred on the DC sample, each 1D window raised to ``1/3``).
3. Keep the central ``n // factor`` samples along the degraded axes.
4. Smooth: multiply by a Hann window (length ``filter_window x m``) on every axis, again raised
   to ``1/3``, and divide by the ratio of sizes so intensities keep their units.
5. The magnitude of the inverse FFT is the true low-resolution volume (e.g. 2 x 1 x 2 mm voxels).
6. It is interpolated back onto the high-resolution grid (linear, mirror boundary, negatives
   clipped to 0; cubic as an option). The network's input is that volume.

Two deliberate differences from the authors' script, both to keep grids physically exact:
the window is a continuous Hann function of the distance to the DC sample (their integer slicing
can shift it by half a sample), and the crop keeps DC at the centre of the smaller spectrum for odd
sizes. Interpolation uses the affines (low-resolution voxel ``j`` sits on high-resolution voxel
``factor * j``, as the DFT samples them) rather than ``scipy.ndimage.zoom``'s corner alignment,
which would stretch the image by ``(n - 1) / (m - 1)``; so the same code serves real acquisitions.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage as ndi

from mrisr_cli.errors import InputError, WeightsError
from mrisr_cli.volumes import checked_array

INTERPOLATION_ORDERS = {"linear": 1, "cubic": 3}


@dataclass(frozen=True)
class DegradationConfig:
    """Everything that defines how a model's inputs were made; stored in every weights file."""

    axes: tuple[int, ...] = (0, 2)
    factor: int = 2
    unfilter_window: float = 1.25
    filter_window: float = 1.5
    window_power: float = 1.0 / 3.0
    interpolation: str = "linear"
    spacing_mm: float = 1.0
    normalisation: str = "zscore-foreground"
    n4: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Types as well as values: these settings also come from weights files' metadata,
        where ``"n4": "false"`` would otherwise read as true."""
        if self.interpolation not in INTERPOLATION_ORDERS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION_ORDERS)}")
        if not _is_int(self.factor) or self.factor < 2:  # 1 would degrade nothing
            raise ValueError(f"factor must be an integer >= 2, got {self.factor!r}")
        axes = tuple(self.axes)
        if (
            not axes
            or not all(_is_int(a) and a in (0, 1, 2) for a in axes)
            or len(set(axes)) != len(axes)
        ):
            raise ValueError(
                f"axes must be one to three distinct axis numbers within 0..2, got {self.axes!r}"
            )
        for name in ("unfilter_window", "filter_window", "window_power", "spacing_mm"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.unfilter_window <= 1:  # no longer, it vanishes on the spectrum it divides
            raise ValueError(
                "unfilter_window must be more than 1 (the spectrum's size), "
                f"got {self.unfilter_window!r}"
            )
        if not isinstance(self.n4, bool):
            raise ValueError(f"n4 must be true or false, got {self.n4!r}")

    def to_json(self) -> str:
        raw = asdict(self)
        raw["axes"] = list(self.axes)
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DegradationConfig:
        try:
            raw = json.loads(text)
            raw["axes"] = tuple(raw["axes"])
            return cls(**raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"degradation settings are not readable: {exc}") from exc

    def factors(self) -> tuple[int, int, int]:
        """Down-sampling factor per canonical axis, e.g. (2, 1, 2)."""
        return tuple(self.factor if a in self.axes else 1 for a in range(3))  # type: ignore[return-value]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def hann_about_centre(size: int, length: float) -> np.ndarray:
    """Hann window of (real) ``length`` samples, centred on index ``size // 2`` (the DC sample
    of an fftshift-ed spectrum) and evaluated at ``size`` points; zero outside its support."""
    distance = np.arange(size, dtype=np.float64) - size // 2
    half = (length - 1.0) / 2.0
    window = 0.5 + 0.5 * np.cos(np.pi * distance / half)
    window[np.abs(distance) > half] = 0.0
    return window


def separable_window(
    shape: tuple[int, ...], rate: float, power: float, epsilon: float = 1e-20
) -> np.ndarray:
    """Product over axes of ``(hann + eps) ** power``, broadcast to ``shape``."""
    window = np.ones(shape, dtype=np.float64)
    for axis, size in enumerate(shape):
        one_d = (hann_about_centre(size, rate * size) + epsilon) ** power
        view = [1] * len(shape)
        view[axis] = size
        window = window * one_d.reshape(view)
    return window


def central_band(shape: tuple[int, ...], factors: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices keeping ``n // f`` samples around the DC sample ``n // 2`` of each axis."""
    slices = []
    for size, factor in zip(shape, factors, strict=True):
        kept = size // factor
        start = size // 2 - kept // 2
        slices.append(slice(start, start + kept))
    return tuple(slices)


def lowres_spectrum(hr: np.ndarray, config: DegradationConfig) -> np.ndarray:
    """The (fftshift-ed) spectrum of the true low-resolution volume: windowed central band."""
    shortest = min(hr.shape)
    if config.unfilter_window * shortest - 1 <= shortest:  # Hann's zero reaches the edge sample
        raise InputError(
            f"the boosting k-space window (--window U = {config.unfilter_window:g}) vanishes at "
            f"the edge of a {shortest}-sample axis, where it would divide by 0: U must be more "
            f"than {1 + 1 / shortest:.4g} for this image"
        )
    spectrum = np.fft.fftshift(np.fft.fftn(hr.astype(np.float64)))
    boosted = spectrum / separable_window(hr.shape, config.unfilter_window, config.window_power)
    band = boosted[central_band(hr.shape, config.factors())]
    ratio = float(np.prod(np.divide(hr.shape, band.shape)))
    return band * separable_window(band.shape, config.filter_window, config.window_power) / ratio


def lowres_volume(hr: np.ndarray, config: DegradationConfig) -> np.ndarray:
    """The true low-resolution volume (shape ``n // factor`` on degraded axes), float32.

    The result is a magnitude image (the authors' ``abs`` of the inverse DFT), which has no
    negative values: an input that has some (z-scored, or shifted) is degraded as its offset to
    0 and shifted back, so that negative tissue is not folded onto positive values. A NaN would
    spread over the whole spectrum: non-finite, constant or non-3D input is an InputError."""
    hr = checked_array(hr, "lowres_volume")
    lowest = float(hr.min())
    offset = min(lowest, 0.0)
    band = lowres_spectrum(hr - offset if offset else hr, config)
    return (np.abs(np.fft.ifftn(np.fft.ifftshift(band))) + offset).astype(np.float32)


def lowres_spacing(shape: tuple[int, ...], factors: tuple[int, ...]) -> tuple[float, ...]:
    """High-res voxels per low-res voxel: ``n / (n // f)``, which is ``f`` only where ``f``
    divides ``n``. The band keeps ``n // f`` of ``n`` DFT samples, so its inverse DFT samples the
    same field of view with that step (81 voxels at f=2: 40 samples, 2.025 voxels apart)."""
    return tuple(n / (n // f) for n, f in zip(shape, factors, strict=True))


def lowres_affine(
    hr_affine: np.ndarray, hr_shape: tuple[int, ...], factors: tuple[int, ...]
) -> np.ndarray:
    """Affine of the low-resolution grid: voxel ``j`` sits where high-res voxel
    ``j * n / (n // f)`` does (``f * j`` when ``f`` divides ``n``)."""
    return hr_affine @ np.diag([*lowres_spacing(hr_shape, factors), 1.0])


def resample_onto_grid(
    data: np.ndarray,
    affine: np.ndarray,
    target_shape: tuple[int, int, int],
    target_affine: np.ndarray,
    *,
    order: int = 1,
) -> np.ndarray:
    """Interpolate ``data`` onto another voxel grid of the same space (mirror boundary)."""
    vox_to_vox = np.linalg.inv(affine) @ target_affine
    out = ndi.affine_transform(
        data.astype(np.float32),
        vox_to_vox[:3, :3],
        offset=vox_to_vox[:3, 3],
        output_shape=tuple(target_shape),
        order=order,
        mode="mirror",
        prefilter=order > 1,
    )
    return np.maximum(out, 0.0).astype(np.float32) if data.min() >= 0 else out


def degrade_volume(
    hr: np.ndarray, config: DegradationConfig | None = None, *, affine: np.ndarray | None = None
) -> np.ndarray:
    """High-res volume -> its k-space degraded version on the same grid (the network input).

    Non-finite (a NaN makes every output voxel NaN), constant or non-3D input is an InputError.
    """
    hr = checked_array(hr, "degrade_volume")
    config = config or DegradationConfig()
    if any(s < 2 * f for s, f in zip(hr.shape, config.factors(), strict=True)):
        raise InputError(f"volume of shape {hr.shape} is too small to degrade by {config.factor}")
    affine = np.eye(4) if affine is None else affine
    low = lowres_volume(hr, config)
    order = INTERPOLATION_ORDERS[config.interpolation]
    return resample_onto_grid(
        low, lowres_affine(affine, hr.shape, config.factors()), hr.shape, affine, order=order
    )
