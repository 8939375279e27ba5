"""Anatomical fidelity of a super-resolved volume: M_h, parcellation Dice and tissue Dice.

Wang et al. 2020 (Sec. 2.4, eq. 4) compare SR and HR in the feature space of a pretrained brain
parcellation network (HighRes3DNet, Li et al. 2017), after N4 bias correction:

    M_h = sum over the 6 feature maps f of  w_f * L1(f(SR), f(HR)),

with w_f "chosen so that each layer contributes equally". Here ``L1`` is the mean absolute
difference over channels and mask voxels, and ``w_f = 1 / mean|f(HR)|`` over the same voxels
(the inverse mean feature magnitude on the reference), so each term is the layer's relative L1
error and all 6 layers are on the same scale; M_h = 0 for identical inputs.

Before the network each volume gets the input normalisation HighRes3DNet was trained with
(NiftyNet): piecewise-linear histogram standardisation to the published landmarks of Li et al.,
then whitening, both over the voxels brighter than the volume's mean ("mean_plus"). The volume is
reoriented to RAS (the network's training orientation), cropped to the mask's bounding box plus a
margin, and run in tiles whose borders are discarded; SR and HR use the same tiles. The
standardisation uses the whole volume's histogram, so it depends on what the volume holds: the
network was trained on whole-head scans and labels most of a skull-stripped brain as background
(``background_fraction`` reports it).

The weights-free tissue fidelity segments each volume into 3 intensity classes inside the mask
(1D k-means on the N4-corrected intensities; on a skull-stripped T1: CSF, grey, white matter) and
reports their Dice between SR and HR.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrisr_cli import intensity
from mrisr_cli.errors import DeviceError, InputError
from mrisr_cli.n4 import n4_correct
from mrisr_cli.networks.highres3dnet import FEATURE_BLOCKS, NUM_LABELS, HighRes3DNet
from mrisr_cli.volumes import canonical_reorientation

# NiftyNet's histogram-standardisation landmarks for HighRes3DNet (the brain-parcellation demo's
# databrain_std_hist_models_otsu.txt): the intensities the percentiles below are mapped onto.
# The demo's config uses cutoffs 0.001/0.999 (percentiles 0.1 and 99.9 as the end points) and the
# "mean" foreground; NiftyNet ignores the quartiles (25, 75) in the mapping.
LI_LANDMARKS = np.array(
    [
        4.4408920985e-16,
        8.06305571158,
        15.5085721044,
        18.7007018006,
        21.5032879029,
        26.1413278906,
        29.9862059045,
        33.8384058795,
        38.1891334787,
        40.7217966068,
        44.0109152758,
        58.3906435207,
        100.0,
    ]
)
LANDMARK_PERCENTILES = np.array(
    [0.1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99.9], dtype=float
)
_USED_LANDMARKS = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]

MH_RULE = (
    "M_h = sum over HighRes3DNet's 6 feature maps (blocks 0,1,2,3,4,6) of w_f * mean|f(SR) - "
    "f(HR)| over channels and mask voxels, with w_f = 1 / mean|f(HR)| over the same voxels "
    "(each layer's relative L1 error, so all layers contribute on the same scale); inputs N4-"
    "corrected, histogram-standardised (Li et al. landmarks) and whitened, RAS orientation"
)
TISSUE_RULE = (
    "3-class 1D k-means of the (N4-corrected) intensities inside the mask, classes ordered by "
    "intensity (T1: CSF-, grey-, white-matter-like), best of two deterministic starts "
    "(quantiles 1/6, 1/2, 5/6; even spacing between percentiles 0.5 and 99.5); each volume "
    "segmented on its own; Dice per class between SR and HR, and their mean"
)


@dataclass(frozen=True)
class FidelityConfig:
    """How the parcellation network is run over a volume."""

    window: int = 112  # largest tile core edge (voxels); bounds memory (~4 GB on CPU)
    border: int = 8  # context added on every side of a tile and discarded afterwards
    margin: int = 8  # voxels around the mask's bounding box that the network also sees


@dataclass(frozen=True)
class ParcellationFidelity:
    """M_h with its per-layer terms, and the Dice of the two parcellations."""

    mh: float
    mh_layers: tuple[float, ...]
    layer_weights: tuple[float, ...]
    dice_mean: float
    dice_labels: dict[int, float] = field(default_factory=dict)
    background_fraction: float = 0.0  # of the mask labelled background in the HR parcellation
    ref_labels: np.ndarray | None = None
    pred_labels: np.ndarray | None = None


@dataclass(frozen=True)
class TissueFidelity:
    """Dice of the 3 intensity classes (dark to bright) and their mean."""

    dice_mean: float
    dice_classes: tuple[float, float, float]


def bias_corrected(
    data: np.ndarray, spacing: tuple[float, float, float], mask: np.ndarray, enabled: bool
) -> np.ndarray:
    """N4 fitted inside ``mask`` (Tustison et al. 2010), as the paper does before M_h; or a copy.

    Give it the whole head or brain: fitted in a small region, the B-spline bias field
    extrapolates badly outside it.
    """
    if not enabled:
        return np.asarray(data, dtype=np.float32)
    return n4_correct(data, spacing, mask=mask)


# --- network input normalisation -------------------------------------------------------------


def histogram_standardise(data: np.ndarray) -> np.ndarray:
    """Nyul-style piecewise-linear map of the mean_plus percentiles onto Li et al.'s landmarks.

    Below the 10th and above the 90th percentile the end segments are extended linearly, as
    NiftyNet does; a segment whose two percentiles coincide gets slope 0.
    """
    flat = np.asarray(data, dtype=np.float64)
    values = flat[flat > flat.mean()]
    if values.size == 0:
        values = flat.ravel()
    percentiles = np.percentile(values, LANDMARK_PERCENTILES)[_USED_LANDMARKS]
    landmarks = LI_LANDMARKS[_USED_LANDMARKS]
    step_in = np.diff(percentiles)
    step_out = np.diff(landmarks)
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.where(step_in > 0, step_out / np.where(step_in > 0, step_in, 1.0), 0.0)
    intercepts = landmarks[:-1] - slopes * percentiles[:-1]
    segment = np.digitize(flat, percentiles[1:-1], right=False)
    return (slopes[segment] * flat + intercepts[segment]).astype(np.float32)


def whiten(data: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the voxels brighter than the volume's mean."""
    values = data[data > data.mean()]
    if values.size == 0:
        values = data.ravel()
    std = float(values.std())
    return ((data - float(values.mean())) / (std if std > 0 else 1.0)).astype(np.float32)


def network_input(data: np.ndarray) -> np.ndarray:
    """The normalisation HighRes3DNet expects: histogram standardisation, then whitening."""
    return whiten(histogram_standardise(data))


# --- tiling -----------------------------------------------------------------------------------


def _axis_tiles(size: int, window: int) -> list[tuple[int, int]]:
    """Split [0, size) into equal-ish cores no longer than ``window``."""
    count = max(1, math.ceil(size / window))
    edges = np.linspace(0, size, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def tiles(
    shape: tuple[int, ...], window: int, border: int
) -> Iterator[tuple[tuple[slice, ...], ...]]:
    """(input slices, core slices in volume, core slices within the input) for each tile.

    Tiles are clipped at the volume's faces, so with ``border`` >= the receptive radius (43) the
    result is exactly that of one pass over the whole volume.
    """
    per_axis = [_axis_tiles(n, window) for n in shape]
    for cores in np.ndindex(*(len(t) for t in per_axis)):
        inp, core, inner = [], [], []
        for axis, index in enumerate(cores):
            start, stop = per_axis[axis][index]
            lo = max(0, start - border)
            hi = min(shape[axis], stop + border)
            inp.append(slice(lo, hi))
            core.append(slice(start, stop))
            inner.append(slice(start - lo, stop - lo))
        yield tuple(inp), tuple(core), tuple(inner)


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The mask's bounding box grown by ``margin`` voxels; an empty mask is an error here."""
    if not mask.any():
        raise InputError("the evaluation mask is empty; nothing to compare")
    return intensity.bounding_box(mask, margin)


# --- M_h and parcellation Dice ----------------------------------------------------------------


def dice_per_label(
    ref_labels: np.ndarray, pred_labels: np.ndarray, num_labels: int
) -> dict[int, float]:
    """Dice of every label present in either volume (label 0, background, left out)."""
    ref_flat = ref_labels.ravel().astype(np.int64)
    pred_flat = pred_labels.ravel().astype(np.int64)
    count_ref = np.bincount(ref_flat, minlength=num_labels)
    count_pred = np.bincount(pred_flat, minlength=num_labels)
    overlap = np.bincount(ref_flat[ref_flat == pred_flat], minlength=num_labels)
    result = {}
    for label in range(1, num_labels):
        total = int(count_ref[label] + count_pred[label])
        if total:
            result[label] = 2.0 * float(overlap[label]) / total
    return result


def parcellation_fidelity(
    model: HighRes3DNet,
    ref: np.ndarray,
    pred: np.ndarray,
    mask: np.ndarray,
    *,
    affine: np.ndarray,
    config: FidelityConfig = FidelityConfig(),
    device: str = "cpu",
    keep_labels: bool = False,
) -> ParcellationFidelity:
    """M_h and parcellation Dice of already bias-corrected SR vs HR volumes on the same grid."""
    if ref.shape != pred.shape or ref.shape != mask.shape:
        raise InputError(f"shapes differ: {ref.shape}, {pred.shape}, mask {mask.shape}")
    orient = canonical_reorientation(affine, ref.shape)
    ref_c = network_input(orient.apply(ref))
    pred_c = network_input(orient.apply(pred))
    mask_c = orient.apply(mask.astype(np.uint8)).astype(bool)
    box = bounding_box(mask_c, config.margin)
    ref_c, pred_c, mask_c = ref_c[box], pred_c[box], mask_c[box]

    n = len(FEATURE_BLOCKS)
    abs_diff = np.zeros(n)
    abs_ref = np.zeros(n)
    labels_ref = np.zeros(ref_c.shape, dtype=np.uint8)
    labels_pred = np.zeros(ref_c.shape, dtype=np.uint8)
    model = model.to(device).eval()
    pair = np.stack([ref_c, pred_c])[:, None]  # (2, 1, X, Y, Z): one batch, same tiles
    try:
        with torch.inference_mode():
            for inp, core, inner in tiles(ref_c.shape, config.window, config.border):
                core_mask = torch.from_numpy(np.ascontiguousarray(mask_c[core])).to(device)
                batch = torch.from_numpy(np.ascontiguousarray(pair[(..., *inp)])).to(device)
                for k, feature in enumerate(model.iter_features(batch)):
                    f = feature[(..., *inner)]
                    if k == n - 1:
                        best = f.argmax(dim=1).to(torch.uint8).cpu().numpy()
                        labels_ref[core], labels_pred[core] = best[0], best[1]
                    if bool(core_mask.any()):
                        ref_f = f[0][:, core_mask]
                        abs_diff[k] += float((f[1][:, core_mask] - ref_f).abs().double().sum())
                        abs_ref[k] += float(ref_f.abs().double().sum())
                    del feature, f
    except torch.OutOfMemoryError as exc:
        raise DeviceError(
            "out of GPU memory running HighRes3DNet; try --device cpu or fewer --jobs"
        ) from exc
    # Both sums are over the same (channels x voxels), so w_f * L1_f = abs_diff / abs_ref.
    weights = tuple(
        float(mask_c.sum() * c / s) if s > 0 else math.nan
        for s, c in zip(abs_ref, _feature_channels(model), strict=True)
    )
    terms = tuple(
        float(d / s) if s > 0 else math.nan for d, s in zip(abs_diff, abs_ref, strict=True)
    )
    dice = dice_per_label(labels_ref, labels_pred, NUM_LABELS)
    return ParcellationFidelity(
        mh=float(sum(terms)),
        mh_layers=terms,
        layer_weights=weights,
        dice_mean=float(np.mean(list(dice.values()))) if dice else math.nan,
        dice_labels=dice,
        background_fraction=float((labels_ref[mask_c] == 0).mean()),
        ref_labels=labels_ref if keep_labels else None,
        pred_labels=labels_pred if keep_labels else None,
    )


def _feature_channels(model: HighRes3DNet) -> list[int]:
    """Channels of each feature map: the out_channels of each feature block's last conv."""
    channels = []
    for index in FEATURE_BLOCKS:
        convs = [m for m in model.block[index].modules() if isinstance(m, torch.nn.Conv3d)]
        channels.append(convs[-1].out_channels)
    return channels


# --- tissue Dice ------------------------------------------------------------------------------


def _lloyd_1d(
    values: np.ndarray, cumulative: np.ndarray, squares: np.ndarray, centres: np.ndarray
) -> tuple[np.ndarray, float]:
    """Lloyd iterations on sorted 1D values; returns the centres and the within-class SSE."""
    tolerance = 1e-9 * max(1.0, float(np.abs(values).max()))
    for _ in range(200):
        cuts = np.searchsorted(values, (centres[:-1] + centres[1:]) / 2)
        edges = np.concatenate([[0], cuts, [values.size]])
        counts = np.diff(edges)
        sums = cumulative[edges[1:]] - cumulative[edges[:-1]]
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centres))
        if np.allclose(new, centres, rtol=0, atol=tolerance):
            break
        centres = new
    cuts = np.searchsorted(values, (centres[:-1] + centres[1:]) / 2)
    edges = np.concatenate([[0], cuts, [values.size]])
    counts = np.diff(edges)
    sums = cumulative[edges[1:]] - cumulative[edges[:-1]]
    sq = squares[edges[1:]] - squares[edges[:-1]]
    sse = float(np.sum(sq - sums**2 / np.maximum(counts, 1)))
    return centres, sse


def kmeans_tissue(data: np.ndarray, mask: np.ndarray, classes: int = 3) -> np.ndarray:
    """Labels 1..classes by increasing intensity inside the mask (0 outside); 1D k-means.

    In 1D the classes are intervals, so one sort plus cumulative sums make each Lloyd iteration
    O(classes log n). Two deterministic starts (equal-count quantiles, and even spacing between
    the 0.5th and 99.5th percentiles, which finds a small bright class) are run and the one with
    the lower within-class sum of squares is kept.
    """
    values = np.sort(data[mask].astype(np.float64))
    if values.size < classes:
        raise InputError("the evaluation mask has too few voxels for a tissue segmentation")
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    squares = np.concatenate([[0.0], np.cumsum(values**2)])
    fractions = (np.arange(classes) + 0.5) / classes
    low, high = np.quantile(values, (0.005, 0.995))
    starts = (np.quantile(values, fractions), low + (high - low) * fractions)
    fits = [_lloyd_1d(values, cumulative, squares, np.sort(s)) for s in starts]
    centres = min(fits, key=lambda fit: fit[1])[0]
    thresholds = (centres[:-1] + centres[1:]) / 2
    labels = np.zeros(data.shape, dtype=np.uint8)
    labels[mask] = (np.digitize(data[mask], thresholds) + 1).astype(np.uint8)
    return labels


def tissue_fidelity(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> TissueFidelity:
    """Dice of the 3-class segmentations of SR and HR (each segmented on its own)."""
    ref_labels = kmeans_tissue(ref, mask)
    pred_labels = kmeans_tissue(pred, mask)
    dice = dice_per_label(ref_labels, pred_labels, 4)
    per_class = tuple(dice.get(c, math.nan) for c in (1, 2, 3))
    return TissueFidelity(dice_mean=float(np.nanmean(per_class)), dice_classes=per_class)  # type: ignore[arg-type]


def read_label_names(weights_path: Path) -> dict[int, str]:
    """Label names from a ``*.ctbl`` colour table beside the weights file (empty if none)."""
    names: dict[int, str] = {}
    for table in sorted(Path(weights_path).parent.glob("*.ctbl"))[:1]:
        for line in table.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
    return names
