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
