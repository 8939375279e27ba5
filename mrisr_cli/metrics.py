"""Image-quality metrics of a super-resolved volume against its reference: PSNR, 3D SSIM, NRMSE,
and two texture metrics in k-space (high-frequency power ratio and correlation).

Computed with torch so that a GPU speeds them up on whole volumes, and defined to agree with
scikit-image (checked to 1e-4 in the tests):

- Intensities: both volumes are mapped with the *reference's* min-max,
  ``x' = (x - min(ref)) / (max(ref) - min(ref))``, so the reference spans [0, 1] and the
  prediction is scaled identically (not clipped: overshoot is an error to be measured).
  The data range of PSNR and SSIM is therefore 1.
- PSNR = 10 log10(1 / MSE); infinite when the volumes are identical (as scikit-image).
- SSIM: Wang et al. 2004, Gaussian window sigma 1.5 truncated at 3.5 sigma (11 taps), population
  (co)variances, K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2 with L = 1; the mean of the
  SSIM map over voxels at least 5 voxels from every face, exactly as
  ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
- NRMSE = ||ref - pred|| / ||ref|| (scikit-image's default "euclidean" normalisation).
- HF power and HF correlation: the high-frequency band of the 3D spectra of both volumes (each
  multiplied by the mask, its edge smoothed), see :func:`high_frequency`; only inside the mask.

Masked variants use only the voxels inside the mask (for SSIM: the map's voxels inside the mask
and inside the 5-voxel border).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mrisr_cli.errors import InputError

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 1.0
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5 voxels: scipy.ndimage's radius rule
# A prediction whose 1st-99th percentile range (in the reference's foreground) is more than
# SCALE_LIMIT times the reference's, or less than 1 / SCALE_LIMIT of it, is on another intensity
# scale (0-1, z-scored, 12-bit...): the shared min-max then makes its scores meaningless.
SCALE_PERCENTILES = (1.0, 99.0)
SCALE_LIMIT = 2.0

NORMALISATION_RULE = (
    "min-max of the reference applied to both volumes: x' = (x - min(ref)) / (max(ref) - "
    "min(ref)); prediction not clipped; data range 1"
)
# The high-frequency band: every frequency above HF_CUTOFF cycles/voxel in magnitude along at
# least one axis, i.e. outside the central half of k-space on some axis.
HF_CUTOFF = 0.25
HF_NO_POWER = 1e-20  # a band holding less than this share of a volume's power holds none
# The mask's edge is smoothed by a Gaussian of this sigma (voxels) before it multiplies the
# volumes: a hard edge adds high frequencies of its own, the same to both volumes, and a
# prediction's values just outside it become a step (0 for a hard mask).
HF_TAPER_SIGMA = 2.0

SSIM_RULE = (
    f"3D SSIM (Wang et al. 2004), Gaussian window sigma {SSIM_SIGMA} truncated at "
    f"{SSIM_TRUNCATE} sigma ({2 * SSIM_RADIUS + 1} taps), population covariances, "
    f"K1={SSIM_K1}, K2={SSIM_K2}, data range {DATA_RANGE:g}, mean over voxels >= {SSIM_RADIUS} "
    "from every face (as scikit-image gaussian_weights=True, use_sample_covariance=False)"
)

HF_RULE = (
    "both normalised volumes multiplied by the mask, its edge smoothed by a Gaussian of sigma "
    f"{HF_TAPER_SIGMA:g} voxels (truncated at {SSIM_TRUNCATE} sigma; the mask first cleared "
    f"within {int(SSIM_TRUNCATE * HF_TAPER_SIGMA + 0.5) + 1} voxels of each face, so the "
    "window is 0 where the DFT wraps around), 3D "
    f"DFT in float64; band: every frequency with |f| > {HF_CUTOFF:g} cycles/voxel along at least "
    "one axis (outside the central half of k-space on some axis); hf_power = sum_band "
    "|F_pred|^2 / sum_band |F_ref|^2 (1: the reference's fine-scale energy; neither direction "
    "is better), hf_corr = Re sum_band F_pred conj(F_ref) / sqrt(sum_band |F_pred|^2 sum_band "
    "|F_ref|^2) (1: the same detail); NaN when the reference has no power in the band (hf_corr "
    "also when the prediction has none)"
)

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class ImageMetrics:
    """The paper's three image metrics, over the whole volume and inside the mask, and the two
    texture metrics of :func:`high_frequency` (inside the mask)."""

    ssim: float
    psnr: float
    nrmse: float
    ssim_mask: float
    psnr_mask: float
    nrmse_mask: float
    hf_power: float
    hf_corr: float

    def as_dict(self) -> dict[str, float]:
        return {
            "ssim": self.ssim,
            "psnr": self.psnr,
            "nrmse": self.nrmse,
            "ssim_mask": self.ssim_mask,
            "psnr_mask": self.psnr_mask,
            "nrmse_mask": self.nrmse_mask,
            "hf_power": self.hf_power,
            "hf_corr": self.hf_corr,
        }


@dataclass(frozen=True)
class HighFrequency:
    """:func:`high_frequency`'s two numbers: power ratio and correlation in the band."""

    power: float
    corr: float


def _tensor(data: ArrayLike, device: str | torch.device) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)


def _mask_tensor(mask: ArrayLike | None, device: str | torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        return mask.to(device=device, dtype=torch.bool)
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).to(device)


def _check_pair(ref: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None) -> None:
    if ref.shape != pred.shape:
        raise InputError(f"shapes differ: reference {tuple(ref.shape)}, prediction {pred.shape}")
    if mask is not None and mask.shape != ref.shape:
        raise InputError(f"mask shape {tuple(mask.shape)} differs from image {tuple(ref.shape)}")


def _check_finite(ref: torch.Tensor, pred: torch.Tensor) -> None:
    """Refuse NaN or infinite voxels, which would make a score NaN or infinite without a word.

    Only the public single metrics check: :func:`image_metrics` passes them on as NaN scores,
    as evaluation and training's validation (a diverged model) record them.
    """
    for name, volume in (("reference", ref), ("prediction", pred)):
        if not bool(torch.isfinite(volume).all()):
            bad = int((~torch.isfinite(volume)).sum())
            raise InputError(f"the {name} holds {bad} NaN or infinite voxels")


def normalise_pair(
    ref: ArrayLike, pred: ArrayLike, *, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both volumes scaled by the reference's min-max, so the reference spans exactly [0, 1]."""
    r = _tensor(ref, device)
    p = _tensor(pred, device)
    low = r.min()
    span = r.max() - low
    if float(span) <= 0:
        raise InputError("reference volume is constant; PSNR/SSIM are undefined")
    return (r - low) / span, (p - low) / span


def psnr(
    ref: ArrayLike,
    pred: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    data_range: float = DATA_RANGE,
    device: str | torch.device = "cpu",
) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical volumes.

    The volumes are compared as given, with a peak of ``data_range`` (1): the caller must
    bring both to that range first, with :func:`normalise_pair` (the reference's min-max, as
    evaluate does; :func:`image_metrics` does it and gives all the metrics). Raw intensities
    give meaningless numbers (about -23 dB for a uint8 scan against its degraded copy).
    NaN or infinite voxels are an InputError.
    """
    r, p = _tensor(ref, device), _tensor(pred, device)
    m = _mask_tensor(mask, device)
    _check_pair(r, p, m)
    _check_finite(r, p)
    return _psnr(r, p, m, data_range)


def _psnr(r: torch.Tensor, p: torch.Tensor, m: torch.Tensor | None, data_range: float) -> float:
    """:func:`psnr` of checked tensors (non-finite voxels give a NaN or infinite score)."""
    diff = (r - p).double()
    if m is not None:
        diff = diff[m]
    if diff.numel() == 0:
        return math.nan
    mse = float((diff * diff).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def nrmse(
    ref: ArrayLike,
    pred: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Root-mean-square error divided by the reference's root mean square (euclidean rule).

    The volumes are compared as given: an offset changes it, so the paper's numbers need
    :func:`normalise_pair` first (:func:`image_metrics` does it). NaN or infinite voxels are an
    InputError.
    """
    r, p = _tensor(ref, device), _tensor(pred, device)
    m = _mask_tensor(mask, device)
    _check_pair(r, p, m)
    _check_finite(r, p)
    return _nrmse(r, p, m)


def _nrmse(r: torch.Tensor, p: torch.Tensor, m: torch.Tensor | None) -> float:
    """:func:`nrmse` of checked tensors."""
    r64, p64 = r.double(), p.double()
    if m is not None:
        r64, p64 = r64[m], p64[m]
    if r64.numel() == 0:
        return math.nan
    denom = float(torch.linalg.vector_norm(r64))
    if denom == 0.0:
        return math.nan
    return float(torch.linalg.vector_norm(r64 - p64)) / denom


def gaussian_taps(
    sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS, device: str | torch.device = "cpu"
) -> list[float]:
    """Normalised 1D Gaussian weights, the same numbers scipy.ndimage.gaussian_filter uses."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return [float(w) for w in weights / weights.sum()]


def _blur_valid(volume: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Separable Gaussian filter keeping only voxels whose window lies inside the volume.

    Shifted-slice accumulation: on CPU it is ~10x faster than conv3d with 1D kernels, and on a
    GPU it is as fast; the cropped border is exactly where scikit-image's reflect padding would
    have mattered, so no padding is needed.
    """
    width = len(taps)
    for axis in range(volume.ndim):
        n = volume.shape[axis] - width + 1
        out = volume.narrow(axis, 0, n) * taps[0]
        for k in range(1, width):
            out.add_(volume.narrow(axis, k, n), alpha=taps[k])
        volume = out
    return volume


def ssim_map(
    ref: ArrayLike,
    pred: ArrayLike,
    *,
    data_range: float = DATA_RANGE,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Local SSIM on the interior of the volume (shape reduced by 2 x 5 voxels per axis).

    Its constants assume volumes in [0, ``data_range``]: see :func:`ssim`.
    """
    r, p = _tensor(ref, device), _tensor(pred, device)
    _check_pair(r, p, None)
    _check_finite(r, p)
    return _ssim_map(r, p, data_range)


def _ssim_map(r: torch.Tensor, p: torch.Tensor, data_range: float) -> torch.Tensor:
    """:func:`ssim_map` of tensors of one shape (non-finite voxels give NaN)."""
    width = 2 * SSIM_RADIUS + 1
    if min(r.shape) < width:
        raise InputError(
            f"volume of shape {tuple(r.shape)} is smaller than the {width}-voxel SSIM window"
        )
    taps = gaussian_taps()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_r = _blur_valid(r, taps)
    mu_p = _blur_valid(p, taps)
    mu_rp = mu_r * mu_p
    mu_rr = mu_r.square_()  # in place: mu_r is not needed any more
    mu_pp = mu_p.square_()
    var_r = _blur_valid(r * r, taps).sub_(mu_rr)
    var_p = _blur_valid(p * p, taps).sub_(mu_pp)
    cov = _blur_valid(r * p, taps).sub_(mu_rp)
    numerator = (2 * mu_rp + c1).mul_(cov.mul_(2).add_(c2))
    denominator = (mu_rr + mu_pp + c1).mul_(var_r.add_(var_p).add_(c2))
    return numerator.div_(denominator)


def ssim(
    ref: ArrayLike,
    pred: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    data_range: float = DATA_RANGE,
    device: str | torch.device = "cpu",
) -> float:
    """Mean 3D SSIM over the interior, or over the interior voxels inside ``mask``.

    Its stabilising constants are ``(0.01 data_range)^2`` and ``(0.03 data_range)^2``, with
    ``data_range`` 1: the caller must scale both volumes to [0, 1] first, with
    :func:`normalise_pair` (as evaluate does; :func:`image_metrics` does it and gives all the
    metrics); raw intensities give wrong values. NaN or infinite voxels are an InputError.
    """
    local = ssim_map(ref, pred, data_range=data_range, device=device)
    m = _mask_tensor(mask, device)
    if m is None:
        return float(local.double().mean())
    _check_pair(_tensor(ref, device), _tensor(pred, device), m)
    r = SSIM_RADIUS
    inner = m[r:-r, r:-r, r:-r]
    if not bool(inner.any()):
        return math.nan
    return float(local[inner].double().mean())


def high_frequency(
    ref: ArrayLike,
    pred: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    device: str | torch.device = "cpu",
) -> HighFrequency:
    """High-frequency power ratio and correlation of the prediction against the reference.

    Why: the project's degradation keeps the central half of k-space along two axes, so all
    the fine-scale detail a low-resolution input lacks, and super-resolution must restore, lies
    outside that central half; PSNR and SSIM, dominated by the low frequencies, cannot say
    whether a prediction restored it or stayed smooth. Both volumes (times the mask where given,
    see below) go through one 3D DFT each, in float64; the band is every frequency above
    :data:`HF_CUTOFF` (0.25) cycles/voxel in magnitude along at least one axis
    (``torch.fft.fftfreq``). It does not depend on which axes were degraded, so it also holds
    the high frequencies along an axis the degradation kept: a low-resolution input is well
    above 0 (power 0.15 and 0.18 on a whole-head and a skull-stripped 1 mm scan, S02 and S15,
    degraded with the default settings). With ``F`` the spectra:

    - ``power = sum_band |F_pred|^2 / sum_band |F_ref|^2``: 1 is the reference's fine-scale
      energy, a blurry or low-resolution prediction is well below 1, noise or artefacts push it
      up (above 1 too): closeness to 1 is better, neither direction is.
    - ``corr = Re sum_band F_pred conj(F_ref) / sqrt(sum_band |F_pred|^2 sum_band |F_ref|^2)``:
      1 where the restored detail is the reference's, about 0 where it is unrelated (noise,
      hallucinated texture), negative where it is inverted.

    The mask multiplies both volumes with its edge smoothed (:func:`tapered_mask`, sigma
    :data:`HF_TAPER_SIGMA`): a hard edge is a step with power in the band, the same in both
    volumes, and it cuts a blurred prediction's spill beyond the edge into a step the reference
    does not have (a Gaussian-blurred skull-stripped scan, sigma 1 voxel: power 0.006 over the
    whole volume, 0.18 inside its hard mask, 0.007 inside the smoothed one).

    Both are NaN when the reference has no power in the band (e.g. an empty mask; a constant
    volume), ``corr`` also when the prediction has none (``power`` is then 0), as NRMSE is NaN
    for a zero reference. The volumes are compared as given: inside a mask an offset changes the
    spectrum (the mask's edge), so bring both to one scale first with :func:`normalise_pair`
    (:func:`image_metrics` does it). NaN or infinite voxels are an InputError.
    """
    r, p = _tensor(ref, device), _tensor(pred, device)
    m = _mask_tensor(mask, device)
    _check_pair(r, p, m)
    _check_finite(r, p)
    return _high_frequency(r, p, m)


def _band_weights(shape: tuple[int, ...], device: str | torch.device) -> torch.Tensor:
    """Weights over ``rfftn``'s half spectrum of a real volume of ``shape``: 0 outside the
    high-frequency band; in it 2 for the bins of the last axis that stand for a conjugate pair
    of the full spectrum, 1 for its DC and (even length) Nyquist bins, which stand for one.

    So ``sum(weights * X)`` over the half spectrum equals the sum of ``X`` over the band of the
    full spectrum, for any ``X`` with Hermitian symmetry (``|F|^2``, ``Re F_p conj(F_r)``); the
    band is symmetric under ``f -> -f`` (|f| decides), so each pair is in it or out of it whole.
    """
    *lead, last = shape
    freqs = [torch.fft.fftfreq(n, dtype=torch.float64, device=device) for n in lead]
    freqs.append(torch.fft.rfftfreq(last, dtype=torch.float64, device=device))
    band = torch.zeros((), dtype=torch.bool, device=device)
    for axis, f in enumerate(freqs):
        view = [1] * len(shape)
        view[axis] = -1
        band = band | (f.abs() > HF_CUTOFF).view(view)
    pairs = torch.full((last // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    pairs[0] = 1.0
    if last % 2 == 0:
        pairs[-1] = 1.0
    return torch.where(band, pairs, 0.0)


def _high_frequency(r: torch.Tensor, p: torch.Tensor, m: torch.Tensor | None) -> HighFrequency:
    """:func:`high_frequency` of checked tensors (non-finite voxels give NaN scores).

    Sums over the spectra's (real, imaginary) pairs, ``Re(a conj(b))`` being
    ``a.re b.re + a.im b.im``: no complex temporaries.
    """
    if m is not None:
        window = tapered_mask(m)
        outside = window == 0  # where a NaN voxel (NaN * 0 = NaN) must not count either
        r = (r * window).masked_fill_(outside, 0.0)
        p = (p * window).masked_fill_(outside, 0.0)
    floor_r, floor_p = _band_floor(r), _band_floor(p)
    spec_r = torch.view_as_real(torch.fft.rfftn(r.double()))  # (..., bins, 2): re and im
    spec_p = torch.view_as_real(torch.fft.rfftn(p.double()))
    weights = _band_weights(tuple(r.shape), r.device).unsqueeze(-1)
    weighted = spec_p * weights
    product = torch.empty_like(weighted)  # torch.dot (BLAS) would vary with the thread count
    power_p = float(torch.mul(weighted, spec_p, out=product).sum())
    cross = float(torch.mul(weighted, spec_r, out=product).sum())
    torch.mul(spec_r, weights, out=weighted)
    power_r = float(torch.mul(weighted, spec_r, out=product).sum())
    if not power_r > floor_r:  # none in the reference's band (or NaN): nothing to compare with
        return HighFrequency(math.nan, math.nan)
    if not power_p > floor_p:  # the correlation with nothing (or NaN) is undefined
        return HighFrequency(0.0 if power_p >= 0 else math.nan, math.nan)
    return HighFrequency(power_p / power_r, cross / math.sqrt(power_r * power_p))


def tapered_mask(mask: torch.Tensor, sigma: float = HF_TAPER_SIGMA) -> torch.Tensor:
    """``mask`` as float32 weights with a soft edge: Gaussian-smoothed (truncated at 3.5 sigma),
    1 deep inside, about 0.5 on its edge, 0 from 3.5 sigma out, and 0 on every face.

    The mask is first cleared within ``radius + 1`` voxels (8 at sigma 2) of each face, then
    smoothed as scipy.ndimage.gaussian_filter(mask, sigma, mode="constant", truncate=3.5) in
    float32: the DFT wraps around, so a window still above 0 at a face (a mask that reaches it:
    a crop, a head cut at the neck) is a step there, high frequencies the same in both volumes
    (on docs/evaluate.md's 96^3 crop of S02 they lifted the LR input's power from 0.127 to
    0.163). The smoothing's spectrum falls as exp(-2 pi^2 sigma^2 f^2): at sigma 2 and the
    band's 0.25 cycles/voxel, to 0.7% of DC, so the band holds the volumes' detail, not the
    mask's edge. ``sigma`` 0: the hard mask as 0/1 weights, faces included.
    """
    weights = mask.to(torch.float32)
    if sigma <= 0:
        return weights
    radius = int(SSIM_TRUNCATE * sigma + 0.5)
    weights = clear_faces(weights, radius + 1)
    padded = torch.nn.functional.pad(weights, [radius] * (2 * weights.ndim))
    return _blur_valid(padded, gaussian_taps(sigma, radius))


def clear_faces(weights: torch.Tensor, width: int) -> torch.Tensor:
    """A copy of ``weights`` with the ``width`` voxels next to every face set to 0."""
    inner = torch.zeros_like(weights)
    core = tuple(slice(width, max(width, n - width)) for n in weights.shape)
    inner[core] = weights[core]
    return inner


def _band_floor(volume: torch.Tensor) -> float:
    """Band power below which a volume has none (:data:`HF_NO_POWER` of its whole spectrum's,
    ``N sum x^2`` by Parseval): the float64 DFT's rounding leaves less than 1e-30 of it in the
    band of a constant volume, where whole real scans have about 1e-2 of it there."""
    norm = float(torch.linalg.vector_norm(volume, dtype=torch.float64))
    return HF_NO_POWER * volume.numel() * norm**2


def robust_range(data: np.ndarray, mask: np.ndarray) -> float:
    """The spread of the intensities in ``mask``: 99th minus 1st percentile (nan when empty)."""
    values = np.asarray(data)[np.asarray(mask, dtype=bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan
    low, high = np.percentile(values, SCALE_PERCENTILES)
    return float(high - low)


def intensity_scale_ratio(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """How much larger the prediction's intensity scale is than the reference's.

    :func:`robust_range` of the prediction over that of the reference, both over the same
    voxels (the reference's foreground): about 1 when both are on one scale, whatever their
    blur or noise. nan when the reference is flat there (no scale to compare with).
    """
    ref_range = robust_range(ref, mask)
    if not ref_range > 0:
        return math.nan
    return robust_range(pred, mask) / ref_range


def scale_differs(ratio: float) -> bool:
    """Whether :func:`intensity_scale_ratio` is outside [1 / SCALE_LIMIT, SCALE_LIMIT]."""
    return math.isfinite(ratio) and not 1 / SCALE_LIMIT <= ratio <= SCALE_LIMIT


def image_metrics(
    ref: ArrayLike,
    pred: ArrayLike,
    mask: ArrayLike,
    *,
    device: str | torch.device = "cpu",
) -> ImageMetrics:
    """All eight numbers for one subject, after the shared min-max normalisation (the texture
    metrics of :func:`high_frequency` inside the mask only).

    Raw intensities in any units are fine here. Unlike the single metrics, NaN or infinite
    voxels are not refused: they give NaN scores, as evaluation and validation record them.
    """
    r, p = normalise_pair(ref, pred, device=device)
    m = _mask_tensor(mask, device)
    _check_pair(r, p, m)
    local = _ssim_map(r, p, DATA_RANGE)
    inner = m[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]
    ssim_whole = float(local.double().mean())
    ssim_inside = float(local[inner].double().mean()) if bool(inner.any()) else math.nan
    del local
    texture = _high_frequency(r, p, m)
    return ImageMetrics(
        ssim=ssim_whole,
        psnr=_psnr(r, p, None, DATA_RANGE),
        nrmse=_nrmse(r, p, None),
        ssim_mask=ssim_inside,
        psnr_mask=_psnr(r, p, m, DATA_RANGE),
        nrmse_mask=_nrmse(r, p, m),
        hf_power=texture.power,
        hf_corr=texture.corr,
    )
