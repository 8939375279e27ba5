"""Image metrics against scikit-image, HighRes3DNet loading, and the fidelity measures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_volume
from safetensors.torch import save_file
from scipy import ndimage as ndi
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity
from torch import nn

from mrisr_cli import metrics
from mrisr_cli.degradation import DegradationConfig, degrade_volume
from mrisr_cli.errors import InputError, WeightsError
from mrisr_cli.fidelity import (
    LI_LANDMARKS,
    FidelityConfig,
    dice_per_label,
    histogram_standardise,
    kmeans_tissue,
    network_input,
    parcellation_fidelity,
    tiles,
    tissue_fidelity,
)
from mrisr_cli.networks import count_parameters
from mrisr_cli.networks.highres3dnet import RECEPTIVE_RADIUS, HighRes3DNet, load_highres3dnet

WEIGHTS_NAME = "parcellation/highresnet/highres3dnet_li_parameters-7d297872.pth"


def skimage_reference(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray | None) -> dict:
    """scikit-image's numbers, on the same min-max normalised float64 volumes."""
    low, span = float(ref.min()), float(ref.max() - ref.min())
    r = (ref.astype(np.float64) - low) / span
    p = (pred.astype(np.float64) - low) / span
    ssim_whole, full = structural_similarity(
        r, p, data_range=1.0, gaussian_weights=True, use_sample_covariance=False, full=True
    )
    out = {
        "ssim": ssim_whole,
        "psnr": peak_signal_noise_ratio(r, p, data_range=1.0),
        "nrmse": normalized_root_mse(r, p),
    }
    if mask is not None:
        inner = (slice(5, -5),) * 3
        out["ssim_mask"] = full[inner][mask[inner]].mean()
        out["psnr_mask"] = peak_signal_noise_ratio(r[mask], p[mask], data_range=1.0)
        out["nrmse_mask"] = normalized_root_mse(r[mask], p[mask])
    return out


def blob(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth positive 'head' with three intensity levels and a little noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(axis=0)) / (min(shape) / 2)
    volume = np.select([radius < 0.3, radius < 0.6, radius < 0.85], [60.0, 150.0, 100.0], 0.0)
    volume = ndi.gaussian_filter(volume.astype(np.float32), 1.0)
    return (volume + rng.normal(0, 2, shape)).astype(np.float32)


# --- image metrics --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(11, 11, 11), (20, 23, 17), (33, 28, 31)])
def test_metrics_agree_with_scikit_image_on_random_volumes(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    ref = (rng.random(shape) * 300 + 20).astype(np.float32)
    pred = (ref + rng.normal(0, 25, shape)).astype(np.float32)
    mask = ndi.gaussian_filter(rng.random(shape), 2) > 0.5
    mask[shape[0] // 2, shape[1] // 2, shape[2] // 2] = True
    ours = metrics.image_metrics(ref, pred, mask).as_dict()
    theirs = skimage_reference(ref, pred, mask)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key
    print(
        f"\n{shape}: max |ours - skimage| = {max(abs(ours[k] - v) for k, v in theirs.items()):.2e}"
    )


def test_metrics_agree_with_scikit_image_on_a_structured_volume() -> None:
    ref = blob((30, 34, 28))
    pred = ndi.gaussian_filter(ref, 0.8) * 1.05 + 3
    mask = ref > 50
    ours = metrics.image_metrics(ref, pred, mask).as_dict()
    for key, value in skimage_reference(ref, pred, mask).items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


def test_identical_volumes_give_the_ideal_values() -> None:
    ref = blob((24, 24, 24))
    result = metrics.image_metrics(ref, ref.copy(), ref > 50)
    assert result.psnr == math.inf and result.psnr_mask == math.inf
    assert result.ssim == pytest.approx(1.0, abs=1e-6)
    assert result.ssim_mask == pytest.approx(1.0, abs=1e-6)
    assert result.nrmse == 0.0 and result.nrmse_mask == 0.0
    assert result.hf_power == pytest.approx(1.0, abs=1e-12)
    assert result.hf_corr == pytest.approx(1.0, abs=1e-12)


def test_normalisation_is_the_reference_min_max_applied_to_both() -> None:
    ref = blob((20, 20, 20), seed=1)
    pred = ndi.gaussian_filter(ref, 1.0)
    r, p = metrics.normalise_pair(ref, pred)
    assert float(r.min()) == 0.0 and float(r.max()) == pytest.approx(1.0)
    span = ref.max() - ref.min()
    np.testing.assert_allclose(p.numpy(), (pred - ref.min()) / span, atol=1e-6)
    # Same affine change of units for both images: the numbers do not move.
    before = metrics.image_metrics(ref, pred, ref > 50).as_dict()
    after = metrics.image_metrics(ref * 7.5 + 300, pred * 7.5 + 300, ref > 50).as_dict()
    for key in before:
        assert after[key] == pytest.approx(before[key], rel=1e-4), key


def test_worse_prediction_scores_worse() -> None:
    ref = blob((24, 26, 22))
    mild, strong = ndi.gaussian_filter(ref, 0.6), ndi.gaussian_filter(ref, 1.5)
    good = metrics.image_metrics(ref, mild, ref > 50)
    bad = metrics.image_metrics(ref, strong, ref > 50)
    assert good.ssim > bad.ssim and good.psnr > bad.psnr and good.nrmse < bad.nrmse


def test_metric_input_errors() -> None:
    ref = blob((12, 12, 12))
    with pytest.raises(InputError, match="shapes differ"):
        metrics.psnr(ref, ref[:-1])
    with pytest.raises(InputError, match="smaller than the 11-voxel SSIM window"):
        metrics.ssim(ref[:10], ref[:10])
    with pytest.raises(InputError, match="constant"):
        metrics.normalise_pair(np.ones((12, 12, 12)), ref)


# --- texture metrics: high-frequency power and correlation ---------------------------------


def textured(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """:func:`blob`'s shells with a fine texture inside (no white noise): a spectrum that falls
    with frequency, as a real scan's does, with power in the band to lose or add."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(axis=0)) / (min(shape) / 2)
    shells = np.select([radius < 0.3, radius < 0.6, radius < 0.85], [60.0, 150.0, 100.0], 0.0)
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 0.7) * 40
    return (ndi.gaussian_filter(shells, 0.7) + np.where(radius < 0.85, texture, 0)).astype(
        np.float32
    )


def truncated(volume: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``volume`` with the outer half of k-space (|f| > 0.25 cycles/voxel) zeroed on ``axes``."""
    spectrum = np.fft.fftn(volume.astype(np.float64))
    for axis in axes:
        view = [1, 1, 1]
        view[axis] = -1
        spectrum *= (np.abs(np.fft.fftfreq(volume.shape[axis])) <= 0.25).reshape(view)
    return np.fft.ifftn(spectrum).real.astype(np.float32)


def numpy_high_frequency(
    ref: np.ndarray, pred: np.ndarray, mask: np.ndarray | None
) -> tuple[float, float]:
    """The definition written out: full complex DFT of both volumes (times the mask, its edge
    smoothed by scipy's Gaussian, sigma 2), the band as the frequencies with |f| > 0.25 on at
    least one axis, sums over it."""
    r, p = ref.astype(np.float64), pred.astype(np.float64)
    if mask is not None:
        weights = ndi.gaussian_filter(mask.astype(np.float64), 2.0, mode="constant", truncate=3.5)
        r, p = r * weights, p * weights
    big_r, big_p = np.fft.fftn(r), np.fft.fftn(p)
    high = [np.abs(np.fft.fftfreq(n)) > 0.25 for n in r.shape]
    band = high[0][:, None, None] | high[1][None, :, None] | high[2][None, None, :]
    power_r = float((np.abs(big_r[band]) ** 2).sum())
    power_p = float((np.abs(big_p[band]) ** 2).sum())
    cross = float((big_p[band] * np.conj(big_r[band])).real.sum())
    return power_p / power_r, cross / math.sqrt(power_r * power_p)


@pytest.mark.parametrize("shape", [(6, 7, 5), (8, 6, 4), (7, 5, 8), (5, 9, 9), (4, 4, 2)])
def test_high_frequency_half_spectrum_equals_the_full_dft(shape) -> None:
    """rfftn keeps half the last axis: the other half's bins are weighted in as conjugate pairs
    (twice), DC and an even axis' Nyquist bin once. Odd and even last axes, against numpy's full
    fftn written out by hand."""
    rng = np.random.default_rng(sum(shape))
    ref = rng.random(shape).astype(np.float32)
    pred = (ref + rng.normal(0, 0.3, shape)).astype(np.float32)
    ours = metrics.high_frequency(ref, pred)
    power, corr = numpy_high_frequency(ref, pred, None)
    assert ours.power == pytest.approx(power, rel=1e-10)
    assert ours.corr == pytest.approx(corr, rel=1e-10)
    # the weights count every band frequency of the full spectrum exactly once
    high = [np.abs(np.fft.fftfreq(n)) > 0.25 for n in shape]
    band = high[0][:, None, None] | high[1][None, :, None] | high[2][None, None, :]
    assert float(metrics._band_weights(shape, "cpu").sum()) == band.sum()


def test_high_frequency_of_a_k_space_truncated_copy() -> None:
    """Zeroing the outer half of k-space on all three axes leaves nothing in the band; on two
    axes (as the project's degradation does) it keeps the band's share with |f| <= 0.25 on both,
    unchanged, so the correlation is exactly the square root of the power ratio."""
    ref = textured((32, 30, 28))
    gone = metrics.high_frequency(ref, truncated(ref, (0, 1, 2)))
    assert 0 <= gone.power < 1e-9
    two = metrics.high_frequency(ref, truncated(ref, (0, 2)))
    assert 0.05 < two.power < 0.6
    assert two.corr == pytest.approx(math.sqrt(two.power), rel=1e-5)
    assert metrics.image_metrics(ref, truncated(ref, (0, 2)), ref > 20).psnr > 30  # 'a good copy'
    degraded = degrade_volume(ref, DegradationConfig(n4=False))  # + Hann windows, interpolation
    input_scores = metrics.high_frequency(ref, degraded)
    assert input_scores.power < 0.8 and input_scores.corr < 0.7


def test_high_frequency_power_falls_with_blur() -> None:
    ref = textured((32, 30, 28))
    mild = metrics.high_frequency(ref, ndi.gaussian_filter(ref, 0.6))
    strong = metrics.high_frequency(ref, ndi.gaussian_filter(ref, 1.0))
    assert strong.power < 0.05 < mild.power < 0.3
    assert strong.corr < mild.corr < 1  # a positive filter keeps the detail's sign


def test_high_frequency_noise_raises_power_and_lowers_correlation() -> None:
    ref = textured((32, 30, 28))
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, ref.shape).astype(np.float32)
    some = metrics.image_metrics(ref, ref + 5 * noise, ref > 20)
    more = metrics.image_metrics(ref, ref + 20 * noise, ref > 20)
    assert 1 < some.hf_power < more.hf_power
    assert more.hf_corr < some.hf_corr < 0.95
    unrelated = metrics.high_frequency(ref, 20 * noise)  # detail that is not the reference's
    assert unrelated.power > 1 and abs(unrelated.corr) < 0.05


def test_high_frequency_scaling() -> None:
    """One change of units for both volumes: the same numbers (the shared normalisation, as for
    PSNR). Twice the contrast: four times the power, the same correlation."""
    ref = textured((24, 26, 22), seed=2)
    pred = ndi.gaussian_filter(ref, 0.6)
    mask = ref > 50
    before = metrics.image_metrics(ref, pred, mask)
    after = metrics.image_metrics(ref * 7.5 + 300, pred * 7.5 + 300, mask)
    assert after.hf_power == pytest.approx(before.hf_power, rel=1e-5)
    assert after.hf_corr == pytest.approx(before.hf_corr, rel=1e-5)
    double = metrics.high_frequency(ref, 2 * pred, mask=mask)
    single = metrics.high_frequency(ref, pred, mask=mask)
    assert double.power == pytest.approx(4 * single.power, rel=1e-5)
    assert double.corr == pytest.approx(single.corr, rel=1e-5)


def test_high_frequency_sees_only_the_mask() -> None:
    """Both volumes are multiplied by the mask, its edge smoothed (sigma 2, so 7 voxels out at
    most): what the prediction does beyond that is not scored, NaN included, and the numbers
    are those of the volumes times scipy's smoothed mask."""
    ref = textured((30, 32, 28), seed=3)
    mask = np.zeros(ref.shape, dtype=bool)
    mask[10:20, 11:21, 9:19] = True
    reach = 7  # int(3.5 sigma + 0.5)
    near = ndi.binary_dilation(mask, np.ones((3, 3, 3), bool), iterations=reach)
    rng = np.random.default_rng(0)
    outside = np.where(near, ref, rng.normal(0, 50, ref.shape)).astype(np.float32)
    scores = metrics.high_frequency(ref, outside, mask=mask)
    assert scores.power == pytest.approx(1.0, abs=1e-12)
    assert scores.corr == pytest.approx(1.0, abs=1e-12)
    assert metrics.high_frequency(ref, outside).power > 1.5  # without the mask it counts
    outside[0, 0, 0] = np.nan
    inside = metrics.image_metrics(ref, outside, mask)  # not refused there: scored as NaN
    assert inside.hf_power == pytest.approx(1.0, abs=1e-6) and math.isnan(inside.psnr)
    pred = ndi.gaussian_filter(ref, 0.8)
    masked = metrics.high_frequency(ref, pred, mask=mask)
    expected = numpy_high_frequency(ref, pred, mask)
    assert (masked.power, masked.corr) == pytest.approx(expected, rel=1e-5)
    full = metrics.image_metrics(ref, pred, mask)  # image_metrics passes its mask on
    assert (full.hf_power, full.hf_corr) == pytest.approx((masked.power, masked.corr), rel=1e-5)


def test_the_tapered_mask_is_scipys_gaussian_and_keeps_a_blurred_copy_low() -> None:
    """A hard mask's edge adds high frequencies of its own, the same to both volumes, and cuts
    a blurred prediction's spill into a step: on a skull-stripped-like volume (zero outside the
    mask) a blurred copy scored as much fine detail as the reference, or more; the smoothed
    edge keeps it near its whole-volume value."""
    rng = np.random.default_rng(4)
    mask = rng.random((22, 24, 20)) > 0.2
    window = metrics.tapered_mask(torch.from_numpy(mask)).numpy()
    inner = np.zeros_like(mask)  # cleared within 8 voxels of each face (radius 7, plus 1)
    inner[8:-8, 8:-8, 8:-8] = mask[8:-8, 8:-8, 8:-8]
    smooth = ndi.gaussian_filter(inner.astype(np.float64), 2.0, mode="constant", truncate=3.5)
    np.testing.assert_allclose(window, smooth, atol=1e-6)
    faces = [window[0], window[-1], window[:, 0], window[:, -1], window[..., 0], window[..., -1]]
    assert all(not face.any() for face in faces)  # 0 where the DFT wraps around
    assert window.max() > 0.3  # the core's mask is still there
    hard = torch.from_numpy(mask)
    assert torch.equal(metrics.tapered_mask(hard, 0), hard.float())  # sigma 0: the mask itself
    ref = textured((32, 30, 28))
    mask = ref > 20  # the 'brain'; zero outside it
    blurred = ndi.gaussian_filter(ref, 1.0)
    whole = metrics.high_frequency(ref, blurred)
    soft = metrics.image_metrics(ref, blurred, mask)
    r, p = (torch.from_numpy(v) * torch.from_numpy(mask) for v in (ref, blurred))
    cut = metrics.high_frequency(r, p)
    assert whole.power < 0.02 and soft.hf_power < 0.05 < 0.3 < cut.power


def test_high_frequency_degenerate_inputs() -> None:
    """No power in the reference's band (an empty mask, a constant volume): NaN, as NRMSE is for
    a zero reference; none in the prediction's: power 0 and an undefined (NaN) correlation.
    A constant reference stops image_metrics as it stops PSNR and SSIM (the normalisation)."""
    ref = textured((16, 18, 14))
    empty = metrics.image_metrics(ref, ndi.gaussian_filter(ref, 1.0), np.zeros(ref.shape, bool))
    assert math.isnan(empty.hf_power) and math.isnan(empty.hf_corr)
    assert math.isnan(empty.psnr_mask)  # the other scores inside the mask agree
    flat = metrics.high_frequency(np.full(ref.shape, 7.0, np.float32), ref)
    assert math.isnan(flat.power) and math.isnan(flat.corr)
    odd = np.full((13, 17, 11), 0.3, np.float32)  # DFT rounding is not exactly 0 at odd sizes
    assert math.isnan(metrics.high_frequency(odd, odd).power)
    smooth = metrics.high_frequency(ref, np.full(ref.shape, 50.0, np.float32))
    assert smooth.power == 0.0 and math.isnan(smooth.corr)
    with pytest.raises(InputError, match="constant"):
        metrics.image_metrics(np.ones(ref.shape), ref, ref > 50)
    with pytest.raises(InputError, match="shapes differ"):
        metrics.high_frequency(ref, ref[:-1])
    with pytest.raises(InputError, match="mask shape"):
        metrics.high_frequency(ref, ref, mask=np.ones((3, 3, 3), bool))


# --- HighRes3DNet ---------------------------------------------------------------------------


def highres3dnet_sizes() -> tuple[int, int]:
    """Parameters and state-dict numbers of HighRes3DNet, counted from the layout in
    :mod:`mrisr_cli.networks.highres3dnet`'s docstring (Li et al. 2017, Fig. 1): convolutions
    without bias; a BatchNorm after the first and the two 1x1x1 convolutions, and before each of
    the 18 dilated convolutions (pre-activation); 2C parameters and 2C + 1 buffers per BatchNorm of
    C channels (running mean and variance, batch counter)."""
    convs = [(1, 16, 27)]  # (in, out, kernel voxels)
    norms = [16]
    for inner, outer in ((16, 16), (16, 32), (32, 64)):  # dilations 1, 2, 4
        for _ in range(3 * 2):  # 3 residual blocks of 2 pre-activation units
            norms.append(inner)
            convs.append((inner, outer, 27))
            inner = outer
    convs += [(64, 80, 1), (80, 160, 1)]
    norms += [80, 160]
    parameters = sum(i * o * k for i, o, k in convs) + sum(2 * c for c in norms)
    return parameters, parameters + sum(2 * c + 1 for c in norms)


def test_highres3dnet_size_and_feature_maps() -> None:
    net = HighRes3DNet().eval()
    parameters, state = highres3dnet_sizes()
    assert (parameters, state) == (821_904, 823_685)  # as counted by hand from the layout
    assert count_parameters(net) == parameters
    assert sum(t.numel() for t in net.state_dict().values()) == state
    with torch.no_grad():
        logits, features = net(torch.randn(1, 1, 9, 8, 7))
    assert [f.shape[1] for f in features] == [16, 16, 32, 64, 80, 160]
    assert logits.shape == (1, 160, 9, 8, 7) and logits is features[-1]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_highres3dnet_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    net = HighRes3DNet().eval()
    for module in net.modules():  # non-trivial BN statistics, so a bad load would show
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_highres3dnet(path)
    assert not loaded.training
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], net(x)[0])


def test_load_highres3dnet_refuses_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_highres3dnet(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a weights file at all")
    with pytest.raises(WeightsError, match="neither a safetensors file nor"):
        load_highres3dnet(garbage)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(WeightsError, match="not HighRes3DNet weights"):
        load_highres3dnet(other)
    state = HighRes3DNet().state_dict()
    state["block.6.convolutional_block.0.weight"] = torch.zeros(4, 80, 1, 1, 1)
    reshaped = tmp_path / "reshaped.pth"
    torch.save(state, reshaped)
    with pytest.raises(WeightsError, match=r"has shape \(4, 80, 1, 1, 1\)"):
        load_highres3dnet(reshaped)
    pickled = tmp_path / "pickled.pth"
    torch.save({"config": object()}, pickled)  # weights_only=True refuses to unpickle it
    with pytest.raises(WeightsError, match="weights-only"):
        load_highres3dnet(pickled)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightsError, match="safetensors"):
        load_highres3dnet(bad_safetensors)


def test_pretrained_weights_load_strictly() -> None:
    net = load_highres3dnet(real_volume(WEIGHTS_NAME))
    assert count_parameters(net) == 821_904


# --- fidelity -------------------------------------------------------------------------------


def test_histogram_standardisation_hits_the_landmarks() -> None:
    rng = np.random.default_rng(3)
    data = rng.gamma(4.0, 20.0, size=(30, 30, 30)).astype(np.float32)
    out = histogram_standardise(data)
    bright = data > data.mean()
    for percentile, landmark in ((0.1, 0), (50, 6), (99.9, 12)):
        assert np.percentile(out[bright], percentile) == pytest.approx(
            LI_LANDMARKS[landmark], abs=0.5
        )
    assert (np.diff(out.ravel()[np.argsort(data.ravel())]) >= -1e-4).all()  # monotone
    whitened = network_input(data)
    above = whitened[whitened > whitened.mean()]
    assert above.mean() == pytest.approx(0.0, abs=1e-4) and above.std() == pytest.approx(1.0)


def test_tiles_cover_every_voxel_once() -> None:
    shape = (17, 9, 12)
    seen = np.zeros(shape, dtype=int)
    for inp, core, inner in tiles(shape, window=6, border=2):
        seen[core] += 1
        for a, b, c in zip(inp, core, inner, strict=True):
            assert a.start + c.start == b.start and a.start + c.stop == b.stop
    assert (seen == 1).all()


def test_kmeans_finds_three_levels_and_dice() -> None:
    truth = np.zeros((20, 20, 20), dtype=np.uint8)
    truth[2:18, 2:18, 2:18] = 1
    truth[5:15, 5:15, 5:15] = 2
    truth[8:12, 8:12, 8:12] = 3
    rng = np.random.default_rng(0)
    image = np.choose(truth, [0.0, 30.0, 80.0, 120.0]) + rng.normal(0, 3, truth.shape)
    labels = kmeans_tissue(image.astype(np.float32), truth > 0)
    np.testing.assert_array_equal(labels, truth)
    assert dice_per_label(truth, labels, 4) == {1: 1.0, 2: 1.0, 3: 1.0}
    shifted = np.roll(truth, 1, axis=0)
    expected = 2 * ((truth == 3) & (shifted == 3)).sum() / (2 * (truth == 3).sum())
    assert dice_per_label(truth, shifted, 4)[3] == pytest.approx(expected)
    same = tissue_fidelity(image, image, truth > 0)
    assert same.dice_mean == 1.0


def _saved_random_highres3dnet(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "highres3dnet.pth"
    torch.save(HighRes3DNet().state_dict(), path)
    return path


def test_mh_and_dice_end_to_end_through_the_loader(tmp_path: Path) -> None:
    """Saved state dict -> real loader -> M_h and Dice on a small volume."""
    model = load_highres3dnet(_saved_random_highres3dnet(tmp_path))
    ref = blob((14, 12, 12))
    mask = ref > 50
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS: exercises the reorientation to RAS
    config = FidelityConfig(window=64, border=8, margin=2)
    same = parcellation_fidelity(model, ref, ref.copy(), mask, affine=affine, config=config)
    assert same.mh == 0.0 and same.dice_mean == 1.0 and len(same.mh_layers) == 6
    assert all(w > 0 for w in same.layer_weights)
    rng = np.random.default_rng(0)
    noisy = [ref + rng.normal(0, s, ref.shape).astype(np.float32) for s in (3.0, 30.0)]
    mild, strong = (
        parcellation_fidelity(model, ref, n, mask, affine=affine, config=config) for n in noisy
    )
    assert 0 < mild.mh < strong.mh
    assert all(math.isfinite(t) and t > 0 for t in mild.mh_layers)
    assert mild.mh == pytest.approx(sum(mild.mh_layers))
    assert 0 <= strong.dice_mean <= mild.dice_mean <= 1


def test_receptive_radius_is_the_networks() -> None:
    """RECEPTIVE_RADIUS (the exact --parcellation-context) is how far one voxel's influence
    reaches, measured on the network with its ReLUs made linear: random ReLUs may cut a path."""
    torch.manual_seed(1)
    model = HighRes3DNet().eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
    centre = RECEPTIVE_RADIUS + 3
    impulse = torch.zeros(1, 1, 2 * centre + 1, 1, 1)
    impulse[0, 0, centre] = 1
    with torch.no_grad():
        response = model(impulse)[0] - model(torch.zeros_like(impulse))[0]
    reached = response.abs().amax(dim=(0, 1, 3, 4)).nonzero().flatten() - centre
    assert (reached.min().item(), reached.max().item()) == (-RECEPTIVE_RADIUS, RECEPTIVE_RADIUS)


def test_tiled_features_equal_one_pass_when_the_border_covers_the_receptive_field(
    tmp_path: Path,
) -> None:
    model = load_highres3dnet(_saved_random_highres3dnet(tmp_path))
    ref = blob((26, 10, 10), seed=4)
    pred = ndi.gaussian_filter(ref, 0.7)
    mask = np.ones(ref.shape, dtype=bool)  # box = volume: 3 tiles of <= 12 along axis 0
    eye = np.eye(4)
    whole = parcellation_fidelity(
        model,
        ref,
        pred,
        mask,
        affine=eye,
        config=FidelityConfig(window=64, border=0, margin=0),
        keep_labels=True,
    )
    tiled = parcellation_fidelity(
        model,
        ref,
        pred,
        mask,
        affine=eye,
        config=FidelityConfig(window=12, border=RECEPTIVE_RADIUS, margin=0),
        keep_labels=True,
    )
    assert tiled.mh == pytest.approx(whole.mh, rel=1e-4)
    np.testing.assert_array_equal(tiled.ref_labels, whole.ref_labels)


@pytest.mark.slow
def test_metrics_agree_with_scikit_image_on_a_real_volume() -> None:
    path = real_volume("t1/S15_antsxnet_brainSR_brainonly.nii.gz")
    from mrisr_cli.degradation import DegradationConfig, degrade_volume
    from mrisr_cli.evaluation import reference_mask
    from mrisr_cli.volumes import load_volume

    volume = load_volume(path)
    pred = degrade_volume(volume.data, DegradationConfig(), affine=volume.affine)
    mask = reference_mask(volume.data)
    ours = metrics.image_metrics(volume.data, pred, mask).as_dict()
    theirs = skimage_reference(volume.data, pred, mask)
    worst = max(abs(ours[k] - v) for k, v in theirs.items())
    print(f"\n{path.name}: max |ours - skimage| = {worst:.2e}")
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.slow
def test_pretrained_highres3dnet_parcellates_a_real_head() -> None:
    """Converted weights + our input normalisation give a many-label parcellation of a head.

    A central 64^3 mask keeps it to one 80^3 tile (about a minute on 2 cores); the input
    normalisation still comes from the whole volume, as in the command.
    """
    path = real_volume("t1/S06_brainchop_t1_crop.nii.gz")
    weights = real_volume(WEIGHTS_NAME)
    from mrisr_cli.degradation import DegradationConfig, degrade_volume
    from mrisr_cli.volumes import load_volume

    volume = load_volume(path)
    pred = degrade_volume(volume.data, DegradationConfig(), affine=volume.affine)
    mask = np.zeros(volume.data.shape, dtype=bool)
    mask[tuple(slice(n // 2 - 32, n // 2 + 32) for n in mask.shape)] = True
    model = load_highres3dnet(weights)
    config = FidelityConfig(window=128, border=8, margin=8)
    result = parcellation_fidelity(
        model, volume.data, pred, mask, affine=volume.affine, config=config, keep_labels=True
    )
    labels = np.unique(result.ref_labels)
    print(
        f"\n{path.name}, central 64^3: {labels.size} labels, background "
        f"{result.background_fraction:.1%}, M_h {result.mh:.3f}, Dice {result.dice_mean:.3f}"
    )
    # Label names from the colour table beside the weights (rows "value name r g b a"). Rather
    # than a label count: the central 64 mm of a brain hold these structures on both sides of the
    # midline, the third ventricle and corpus callosum between them, and each left/right pair
    # the network finds lies on its own side (the crop is in RAS order: axis 0 points right).
    table = weights.parent / "GIFNiftyNet.ctbl"
    value = {
        row.split()[1]: int(row.split()[0]) for row in table.read_text().splitlines() if row.strip()
    }
    assert {value["3rd-Ventricle"], value["Corpus-Callosum"]} <= set(labels.tolist())
    central = ("Thalamus-Proper", "Caudate", "Putamen", "Pallidum", "Lateral-Ventricle")
    central += ("Frontal-White-Matter", "MCgG-middle-cingulate-gyrus")
    pairs = [n[5:] for n in value if n.startswith("Left-") and f"Right-{n[5:]}" in value]
    # both sides at least 100 voxels (a 4.6 mm cube): not specks at the crop's edge, whose
    # centroids a few voxels (argmax near-ties on other hardware) could move
    voxels = np.bincount(result.ref_labels.ravel(), minlength=max(value.values()) + 1)
    both = [p for p in pairs if min(voxels[value[f"Left-{p}"]], voxels[value[f"Right-{p}"]]) >= 100]
    assert set(central) <= set(both), set(central) - set(both)
    for structure in both:
        left = np.argwhere(result.ref_labels == value[f"Left-{structure}"])[:, 0].mean()
        right = np.argwhere(result.ref_labels == value[f"Right-{structure}"])[:, 0].mean()
        assert left < right, structure
    assert result.background_fraction < 0.2
    assert result.mh > 0 and 0.5 < result.dice_mean < 1
