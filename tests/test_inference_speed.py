"""The fast inference path gives the straightforward path's output, where it promises to.

The rules (see :mod:`mrisr_cli.inference`): tiles that run give exactly the output of running
every patch with the plain network (BatchNorm unfolded, channels-first); exactly constant patches
reuse one run; non-constant patches that hold nothing above the background threshold are not run
and their voxels keep the input's values. Half precision is close (PSNR > 50 dB), not equal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import TINY_RRDG, head_phantom, real_volume
from torch import nn
from typer.testing import CliRunner

from mrisr_cli import inference
from mrisr_cli.errors import DeviceError
from mrisr_cli.fusion import conv_bn_pairs, fold_batchnorm
from mrisr_cli.inference import (
    CONTENT_BLOCK,
    InferenceOptions,
    content_blocks,
    plan_tiles,
    prepare_network,
    resolve_half,
    super_resolve,
)
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.tiling import TileGrid, blend_window, crop_core, pad_for_grid, tiles_with_content

PATCH = (26, 20, 28)  # core 20 x 14 x 22: many tiles at a fraction of the paper patch's cost
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny networks are many small ops: one thread is faster, above all on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as after training."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
    return model.eval()


def _tiny_rrdg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _random_bn_stats(build_network(TINY_RRDG), seed)


def _straightforward(volume: np.ndarray, model: nn.Module, grid: TileGrid) -> np.ndarray:
    """Pad, run every patch with the plain network, crop, place: no shortcut at all.

    All patches go in one call (eval mode: samples are independent); one by one is far slower
    for tiny networks, whose convolutions torch then runs without oneDNN.
    """
    padded = pad_for_grid(volume, grid)
    out = np.zeros(grid.covered_shape, np.float32)
    starts = list(grid.starts())
    patches = np.stack([padded[grid.patch_slices(start)] for start in starts])
    with torch.no_grad():
        results = model(torch.from_numpy(patches)[:, None])[:, 0].numpy()
    for start, result in zip(starts, results, strict=True):
        out[grid.core_slices(start)] = crop_core(result, grid.margin)
    return out[: volume.shape[0], : volume.shape[1], : volume.shape[2]]


def _core_mask(grid: TileGrid, starts: list[tuple[int, int, int]]) -> np.ndarray:
    mask = np.zeros(grid.covered_shape, bool)
    for start in starts:
        mask[grid.core_slices(start)] = True
    return mask[: grid.shape[0], : grid.shape[1], : grid.shape[2]]


def _whole_head_like(shape: tuple[int, int, int] = (60, 42, 66)) -> np.ndarray:
    """A 'head' in the middle, exact-zero air on one side, noisy air on the other, normalised."""
    rng = np.random.default_rng(3)
    volume = np.zeros(shape, np.float32)
    volume[22:52, 8:36, 14:50] = head_phantom((30, 28, 36), seed=1)
    volume[:, :, 50:] = np.abs(rng.normal(0, 1.0, (shape[0], shape[1], shape[2] - 50)))
    volume[:16] = 0.0
    return (volume - volume.mean()) / volume.std()


# --- BatchNorm folding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "folds"),
    [
        ("rrdg", {"features": 4, "blocks": 1, "growth": 2}, 16),
        ("srresnet", {"features": 8, "blocks": 2, "outer_kernel": 3}, 5),
        ("mdcsrn", {"growth": 4, "blocks": 2, "units": 2}, 0),  # BN-ELU-conv: BN precedes
        ("fsrcnn", {"d": 4, "s": 2, "m": 1}, 0),
    ],
)
def test_folded_network_equals_the_plain_one(name: str, params: dict, folds: int) -> None:
    torch.manual_seed(0)
    model = _random_bn_stats(build_network(NetworkConfig(name, params)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert len(conv_bn_pairs(model)) == folds
    remaining = sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    assert remaining == sum(isinstance(m, nn.BatchNorm3d) for m in model.modules()) - folds
    x = torch.randn(2, 1, 18, 14, 16)
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) < 1e-5
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched


class _SharedConv(nn.Module):
    """A conv whose output feeds its BatchNorm and a skip: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm3d(3)
        self.other = nn.Conv3d(3, 3, 1)
        self.norm2 = nn.BatchNorm3d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y + self.norm2(self.other(y))


def test_batchnorm_is_folded_only_where_the_conv_feeds_it_alone() -> None:
    model = _random_bn_stats(_SharedConv())
    assert conv_bn_pairs(model) == [("other", "norm2")]
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert float((fold_batchnorm(model)(x) - model(x)).abs().max()) < 1e-5


# --- tiles: what runs, and the output everywhere ---------------------------------------------


@pytest.fixture(scope="module")
def whole_head() -> tuple[np.ndarray, nn.Module, np.ndarray]:
    """A whole-head-like volume, a tiny RRDG, and the straightforward path's output."""
    volume = _whole_head_like()
    model = _tiny_rrdg()
    return volume, model, _straightforward(volume, model, TileGrid(volume.shape, PATCH))  # type: ignore[arg-type]


def test_fast_path_equals_straightforward_path_where_promised(whole_head) -> None:
    """Run and constant tiles: straightforward output (< 1e-5); background tiles: the input."""
    volume, model, reference = whole_head
    options = InferenceOptions(patch=PATCH, batch_size=3)
    grid = TileGrid(volume.shape, PATCH)  # type: ignore[arg-type]
    plan = plan_tiles(pad_for_grid(volume, grid), grid, options)
    assert plan.run and plan.constant and plan.background  # all three rules are exercised
    fast = super_resolve(volume, model, options)
    network = _core_mask(grid, plan.run + plan.constant)
    background = _core_mask(grid, plan.background)
    assert not (network & background).any() and (network | background).all()
    assert float(np.abs(fast - reference)[network].max()) < 1e-5
    np.testing.assert_array_equal(fast[background], volume[background])
    assert float(volume[background].max()) <= float(volume.min()) + 0.1 * float(np.ptp(volume))


def test_switches_off_give_the_straightforward_path_everywhere(whole_head) -> None:
    volume, model, reference = whole_head
    plain = InferenceOptions(
        patch=PATCH, skip_background=False, fold_batchnorm=False, channels_last=False
    )
    assert float(np.abs(super_resolve(volume, model, plain) - reference).max()) < 1e-5


def test_a_patch_with_one_tissue_voxel_in_its_margin_runs() -> None:
    """One voxel of tissue anywhere in a patch's input (core or margin) makes it run."""
    volume = _whole_head_like()  # noisy air for z >= 50, head in the middle
    tissue = float(volume.max())
    volume[2, 2, 61] = tissue  # the core of the tile at (0, 0, 44) (cores are 20 x 14 x 22)
    volume[2, 33, 43] = tissue  # z = 43: the margin of the tiles at z = 44, a core at z = 22
    grid = TileGrid(volume.shape, PATCH)  # type: ignore[arg-type]
    found = tiles_with_content(grid, content_blocks(volume), CONTENT_BLOCK)
    has = dict(zip(grid.starts(), found, strict=True))
    assert has[(0, 0, 44)] and has[(0, 28, 44)] and has[(0, 28, 22)]
    assert not has[(0, 14, 44)]  # noisy air, no tissue within its input: passed through


def test_content_blocks_ignore_air_noise_and_see_tissue() -> None:
    volume = _whole_head_like()
    blocks = content_blocks(volume)
    assert blocks.shape == tuple(-(-n // CONTENT_BLOCK) for n in volume.shape)
    assert not blocks[:, :, 26:].any()  # z >= 52: noise only
    assert blocks[16:22, 9:13, 13:19].all()  # the middle of the head (centre 37, 22, 32)


class _Constant(nn.Module):
    """A network whose output is ``value`` everywhere: after denormalisation that is
    ``mean + value * std`` of the statistics the pipeline used."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.scale = nn.Parameter(torch.zeros(()))  # a parameter, so it has a device and dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.value


def test_upsample_array_normalises_with_the_whole_volume_foreground(psnr_weights) -> None:
    """upsample_array's statistics are the mean and std of the foreground that the plain rule
    finds on the whole volume (threshold, largest component, holes filled: scipy, no boxes), here
    for a head that touches a face of the array. Read back through constant networks: 0 gives the
    mean, 1 the mean plus one std."""
    from scipy import ndimage as ndi

    from mrisr_cli.intensity import FOREGROUND_FRACTION
    from mrisr_cli.pipeline import load_generator_files, upsample_array

    data = np.zeros((44, 30, 50), np.float32)
    data[10:40, 4:30, 12:48] = head_phantom((30, 36, 36), seed=2)[:, :26]  # cut by one face
    peak = float(data.max())
    air = data == 0
    data[air] = np.random.default_rng(0).uniform(0, 0.05 * peak, int(air.sum()))  # dim noise
    data[0, 0, 0] = 0.0  # the minimum
    data[2, 20, 3] = data[40, 3, 45] = peak  # bright specks in the air: separate components
    data[22:26, 14:18, 26:32] = 0.0  # a cavity in the head: a hole in the thresholded mask
    low = float(data.min())
    threshold = low + FOREGROUND_FRACTION * (float(np.percentile(data[data > low], 99)) - low)
    labels, count = ndi.label(data > threshold)
    mask = ndi.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    assert count >= 3 and mask[24, 16, 28] and not mask[2, 20, 3]  # specks dropped, hole filled
    assert mask[:, -1, :].any()  # the foreground reaches the array's face
    mean, std = float(data[mask].mean()), float(data[mask].std())
    assert 0 < std < mean  # so mean + std stays above the clip at 0 and differs from the mean
    generator = load_generator_files(psnr_weights, None).generator(1.0, "cpu")
    options = InferenceOptions(patch=PATCH, skip_background=False)
    for value in (0.0, 1.0):
        generator.model = _Constant(value)
        out = upsample_array(data, generator, options=options)
        np.testing.assert_allclose(out, mean + value * std, rtol=1e-5)


# --- overlap ----------------------------------------------------------------------------------


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


@pytest.mark.parametrize("shape", [(65, 41, 63), (7, 5, 9), (130, 35, 59)])
def test_overlapping_tiles_reproduce_the_volume_with_an_identity_network(
    shape: tuple[int, int, int],
) -> None:
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    options = InferenceOptions(overlap=10, skip_background=False, batch_size=3)
    out = super_resolve(volume, _Identity(), options)
    np.testing.assert_allclose(out, volume, rtol=0, atol=1e-6)


def test_overlap_grid_covers_the_volume_and_ramps_are_complementary() -> None:
    grid = TileGrid((130, 35, 59), overlap=10)
    assert grid.stride == (48, 24, 48)
    assert all(c >= n for c, n in zip(grid.covered_shape, grid.shape, strict=True))
    window = blend_window(grid)
    ramp = window[:, window.shape[1] // 2, window.shape[2] // 2]
    np.testing.assert_allclose(ramp[-10:] + ramp[:10], 1.0, atol=1e-6)
    assert (window > 0).all()
    with pytest.raises(ValueError):
        TileGrid((64, 40, 64), overlap=34)


def test_overlap_brings_tiled_output_closer_to_whole_volume_inference() -> None:
    """The seam test: blended overlaps are closer to one whole-volume pass than plain tiles.

    Compared away from the outer faces (8 voxels), where the whole-volume pass zero-pads and the
    tiles edge-pad: that difference is not a seam and overlap does not change it.
    """
    model = _tiny_rrdg()
    volume = _whole_head_like((52, 40, 56))
    with torch.no_grad():
        whole = model(torch.from_numpy(volume)[None, None])[0, 0].numpy()
    base = dict(patch=(34, 26, 34), skip_background=False)  # 8 tiles, or 27 with overlap 6
    plain = super_resolve(volume, model, InferenceOptions(**base))  # type: ignore[arg-type]
    blended = super_resolve(volume, model, InferenceOptions(**base, overlap=6))  # type: ignore[arg-type]
    inner = (slice(8, -8),) * 3

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a[inner] - whole[inner]) ** 2)))

    print(f"seam RMS vs whole-volume inference: no overlap {rms(plain):.4f}, 6 {rms(blended):.4f}")
    assert rms(blended) < 0.5 * rms(plain)


# --- precision and devices --------------------------------------------------------------------


def test_half_falls_back_to_fp32_on_a_cpu_without_native_bf16(monkeypatch) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    half, warning = resolve_half("cpu", True)
    assert half is False and warning is not None and "fp32" in warning
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_half("cpu", True) == (True, None)
    assert resolve_half("cpu", False) == (False, None)


def _record_run_dtypes(monkeypatch) -> list[torch.dtype]:
    """The dtype of every network that super_resolve prepares (and then runs), in order."""
    seen: list[torch.dtype] = []
    prepare = inference.prepare_network

    def spy(model: nn.Module, options: InferenceOptions) -> nn.Module:
        net = prepare(model, options)
        seen.append(next(net.parameters()).dtype)
        return net

    monkeypatch.setattr(inference, "prepare_network", spy)
    return seen


def _native_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(inference, "fast_half_available", lambda device: native)


def test_library_half_falls_back_to_fp32_for_every_caller(
    monkeypatch, tmp_path, phantom_file, psnr_weights
) -> None:
    """``InferenceOptions(half=True)`` into super_resolve, upsample_array or upsample_file on a
    CPU without native bf16 runs fp32, as the CLI does: same output, warning and sidecar say so."""
    from mrisr_cli.pipeline import (
        UpsampleOptions,
        load_generator_files,
        upsample_array,
        upsample_file,
    )

    _native_bf16(monkeypatch, False)
    seen = _record_run_dtypes(monkeypatch)
    volume = _whole_head_like()
    model = _tiny_rrdg()
    fp32 = super_resolve(volume, model, InferenceOptions(patch=PATCH))
    half = super_resolve(volume, model, InferenceOptions(patch=PATCH, half=True))
    np.testing.assert_array_equal(half, fp32)
    generator = load_generator_files(psnr_weights, None).generator(1.0, "cpu")
    data = head_phantom((30, 24, 32))
    options = InferenceOptions(patch=PATCH, half=True)
    np.testing.assert_array_equal(
        upsample_array(data, generator, options=options),
        upsample_array(data, generator, options=InferenceOptions(patch=PATCH)),
    )
    out = tmp_path / "half.nii.gz"
    result = upsample_file(phantom_file, out, generator, UpsampleOptions(inference=options))
    assert seen and set(seen) == {torch.float32}
    assert any("no native bf16" in w for w in result.warnings)
    sidecar = json.loads((tmp_path / "half.json").read_text())
    assert sidecar["half"] is False and sidecar["precision"] == "fp32"
    assert any("no native bf16" in w for w in sidecar["warnings"])


def test_library_half_runs_bf16_where_it_is_native(
    monkeypatch, tmp_path, phantom_file, fast_weights
) -> None:
    """Where bf16 is native (here: pretended) half stays half: the network runs in bf16."""
    from mrisr_cli.pipeline import UpsampleOptions, load_generator_files, upsample_file

    _native_bf16(monkeypatch, True)
    seen = _record_run_dtypes(monkeypatch)
    generator = load_generator_files(fast_weights, None).generator(1.0, "cpu")
    options = UpsampleOptions(inference=InferenceOptions(patch=PATCH, half=True))
    result = upsample_file(phantom_file, tmp_path / "bf16.nii.gz", generator, options)
    assert seen == [torch.bfloat16] and not result.warnings
    sidecar = json.loads((tmp_path / "bf16.json").read_text())
    assert sidecar["half"] is True and sidecar["precision"] == "bf16"


def test_cli_demo_half_warns_and_runs_fp32_without_native_bf16(
    monkeypatch, tmp_path, fast_weights
) -> None:
    from mrisr_cli.cli import app

    _native_bf16(monkeypatch, False)
    seen = _record_run_dtypes(monkeypatch)
    args = ["demo", str(tmp_path / "demo"), "--psnr-weights", str(fast_weights), "--half"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "no native bf16" in result.output and "running in fp32" in result.output
    assert seen == [torch.float32]


def _cpu_bf16_flags(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    """The CPU features that fast_half_available reads from torch, pretended."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"),
    [(False, False, False), (True, False, True), (False, True, True)],
    ids=["no-native-bf16", "avx512-bf16", "amx"],
)
def test_cli_half_on_cpu_runs_bf16_only_with_native_bf16(
    monkeypatch, tmp_path, phantom_file, fast_weights, avx512_bf16: bool, amx: bool, native: bool
) -> None:
    """Both branches on any machine: with AVX512-BF16 or AMX, ``--half`` runs the network in bf16
    silently; without either, it warns and runs fp32. The sidecar says what ran."""
    from mrisr_cli.cli import app

    _cpu_bf16_flags(monkeypatch, avx512_bf16, amx)
    seen = _record_run_dtypes(monkeypatch)
    out = tmp_path / "out.nii.gz"
    args = ["upsample", str(phantom_file), str(out), "--psnr-weights", str(fast_weights)]
    options = ["--device", "cpu", "--half", "--patch", "26,20,28", "--threads", "1"]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "out.json").read_text())
    if native:
        assert "no native bf16" not in result.output
        assert seen == [torch.bfloat16]
        assert sidecar["half"] is True and sidecar["precision"] == "bf16"
    else:
        assert "no native bf16" in result.output and "running in fp32" in result.output
        assert seen == [torch.float32]
        assert sidecar["half"] is False and sidecar["precision"] == "fp32"
        assert any("no native bf16" in w for w in sidecar["warnings"])


def test_cli_margin_and_overlap(tmp_path, phantom_file, psnr_weights) -> None:
    from mrisr_cli.cli import app

    args = ["upsample", str(phantom_file), str(tmp_path / "o.nii.gz")]
    args += ["--psnr-weights", str(psnr_weights), "--patch", "26,20,28", "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "--margin", "4", "--overlap", "6"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*args, "--overlap", "14", "--overwrite"])
    assert result.exit_code == 1 and "--overlap 14 must be below the patch core" in result.output


def test_cli_margin_reaches_the_tiles(tmp_path, phantom_file, psnr_weights, monkeypatch) -> None:
    """--margin 4 gives what running every patch with margin 4 gives, not the paper's 3.

    The reference is the CLI with its tiling replaced by `_straightforward` on a margin-4 grid
    (the phantom's tiles all run or are constant: no background tile keeps the input).
    """
    import nibabel as nib

    from mrisr_cli import pipeline
    from mrisr_cli.cli import app

    def upsample(name: str, margin: int) -> np.ndarray:
        out = tmp_path / name
        args = ["upsample", str(phantom_file), str(out), "--psnr-weights", str(psnr_weights)]
        args += ["--patch", "26,20,28", "--threads", "1", "--margin", str(margin)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return np.asarray(nib.load(out).dataobj, dtype=np.float32)

    margin4, margin3 = upsample("m4.nii.gz", 4), upsample("m3.nii.gz", 3)

    def patch_by_patch(volume, model, options, progress=None) -> np.ndarray:
        grid = TileGrid(volume.shape, options.patch, 4)
        assert not plan_tiles(pad_for_grid(volume, grid), grid, options).background
        return _straightforward(volume, model, grid)

    monkeypatch.setattr(pipeline, "super_resolve", patch_by_patch)
    reference = upsample("reference.nii.gz", 4)
    scale = float(np.ptp(reference))
    assert float(np.abs(margin3 - reference).max()) > 1e-2 * scale  # the margin matters here
    np.testing.assert_allclose(margin4, reference, rtol=0, atol=1e-4 * scale)


def _psnr(reference: np.ndarray, test: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - test) ** 2))
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _real_crop() -> np.ndarray:
    """54 x 36 x 27 voxels of real anatomy: 2 x 2 x 1 tiles of the test's 33 x 24 x 33 patch, all
    run (emulated bf16 takes about half a second per tile)."""
    import nibabel as nib

    path = real_volume("t1/S08_stroke_T1.nii.gz")
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)[30:84, 50:86, 40:67]


def _upsample(data: np.ndarray, model: nn.Module, options: InferenceOptions) -> np.ndarray:
    """As `upsample_array`: normalise with the input's foreground, run, map back."""
    from mrisr_cli.intensity import foreground_mask, foreground_stats

    stats = foreground_stats(data, foreground_mask(data))
    return stats.denormalise(super_resolve(stats.normalise(data), model, options))


@pytest.mark.slow
def test_bf16_on_cpu_is_within_50_db_of_fp32_on_a_real_crop(monkeypatch) -> None:
    """bf16 (emulated, slow, on CPUs without native support) against fp32 in the input's units."""
    _native_bf16(monkeypatch, True)  # run bf16 even where super_resolve would fall back to fp32
    seen = _record_run_dtypes(monkeypatch)
    data = _real_crop()
    model = _tiny_rrdg()
    patch = (33, 24, 33)
    fp32 = _upsample(data, model, InferenceOptions(patch=patch))
    bf16 = _upsample(data, model, InferenceOptions(patch=patch, half=True))
    assert seen == [torch.float32, torch.bfloat16]
    psnr = _psnr(fp32, bf16)
    print(f"bf16 vs fp32 on a real T1 crop {data.shape}: PSNR {psnr:.1f} dB")
    assert psnr > 50


@pytest.mark.gpu
@cuda
def test_cuda_fp32_equals_cpu_and_fp16_is_within_50_db_on_a_real_volume() -> None:
    """Pinned buffers, async copies, a padded last batch: same numbers as the CPU path."""
    import nibabel as nib

    path = real_volume("t1/S08_stroke_T1.nii.gz")
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    model = _tiny_rrdg()
    cpu = _upsample(data, model, InferenceOptions(device="cpu"))
    gpu = _upsample(data, model, InferenceOptions(device="cuda", batch_size=3))
    assert float(np.abs(gpu - cpu).max()) < 1e-3 * float(np.ptp(cpu))
    fp16 = _upsample(data, model, InferenceOptions(device="cuda", half=True, batch_size=5))
    psnr = _psnr(cpu, fp16)
    print(f"fp16 vs fp32 on {path.name}: PSNR {psnr:.1f} dB")
    assert psnr > 50


@pytest.mark.gpu
@cuda
def test_cuda_settings_are_restored_after_inference() -> None:
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    super_resolve(
        np.random.rand(30, 20, 30).astype(np.float32),
        _tiny_rrdg(),
        InferenceOptions(device="cuda", patch=PATCH),
    )
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == saved


def test_cuda_settings_hold_while_any_thread_runs_and_are_restored_after_the_last() -> None:
    """cuDNN's flags are process-wide: a run ending in one thread must not turn autotuning off
    (or TF32 on) under a run still going in another, and the last one out restores them. No GPU
    is needed: the flags can be set without one."""
    backends = torch.backends.cudnn
    saved = (backends.benchmark, backends.allow_tf32)
    cuda = InferenceOptions(device="cuda")
    try:
        backends.benchmark, backends.allow_tf32 = False, True  # the caller's own settings
        first, second = inference._cuda_settings(cuda), inference._cuda_settings(cuda)
        first.__enter__()
        second.__enter__()
        assert (backends.benchmark, backends.allow_tf32) == (True, False)
        first.__exit__(None, None, None)  # one thread's run ends; the other's is still going
        assert (backends.benchmark, backends.allow_tf32) == (True, False)
        second.__exit__(None, None, None)
        assert (backends.benchmark, backends.allow_tf32) == (False, True)
    finally:
        backends.benchmark, backends.allow_tf32 = saved


@pytest.mark.slow
def test_compiled_network_gives_the_same_output() -> None:
    volume = _whole_head_like()
    model = _tiny_rrdg()
    eager = super_resolve(volume, model, InferenceOptions(patch=PATCH))
    compiled = super_resolve(volume, model, InferenceOptions(patch=PATCH, compile=True))
    assert float(np.abs(compiled - eager).max()) < 1e-4


def test_compile_without_a_compiler_is_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slim images (mrisr's container) have no C++ compiler: --compile must say so in one line."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/g++",))
    torch._dynamo.reset()
    expected = r"^--compile failed \(.*C\+\+ compiler.*\); run"
    try:
        with pytest.raises(DeviceError, match=expected) as err:
            super_resolve(
                np.random.rand(30, 20, 30).astype(np.float32),
                _tiny_rrdg(),
                InferenceOptions(patch=PATCH, compile=True),
            )
    finally:
        torch._dynamo.reset()
    assert "\n" not in str(err.value)


def test_prepared_network_leaves_the_model_alone() -> None:
    model = _tiny_rrdg().train()
    net = prepare_network(model, InferenceOptions())
    assert model.training and not net.training
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def test_prepared_copy_is_reused_until_the_weights_change() -> None:
    model = _tiny_rrdg()
    options = InferenceOptions()
    first = prepare_network(model, options)
    assert prepare_network(model, options) is first
    with torch.no_grad():
        model.conv_first.weight.mul_(2.0)  # an optimiser step or load_state_dict, in place
    second = prepare_network(model, options)
    assert second is not first
    x = torch.randn(2, 1, 12, 10, 14)
    with torch.no_grad():
        assert float((second(x) - model(x)).abs().max()) < 1e-5


# --- N4 ---------------------------------------------------------------------------------------


def test_n4_takes_its_settings() -> None:
    """Shrink factor and convergence reach ANTs (mrisr keeps ANTs' defaults: docs/speed.md)."""
    from mrisr_cli.n4 import n4_correct

    volume = head_phantom((32, 28, 30)) + 10.0
    volume *= np.linspace(0.7, 1.3, volume.shape[0], dtype=np.float32)[:, None, None]
    one = n4_correct(volume, (1.0,) * 3, shrink_factor=2, convergence={"iters": [1], "tol": 0})
    more = n4_correct(volume, (1.0,) * 3, shrink_factor=2, convergence={"iters": [20], "tol": 0})
    assert one.shape == volume.shape and one.dtype == np.float32
    assert not np.allclose(one, more)
    # neither 1 nor 2 is the default shrink factor (4): both must reach ANTs to differ
    finer = n4_correct(volume, (1.0,) * 3, shrink_factor=1, convergence={"iters": [20], "tol": 0})
    assert not np.allclose(finer, more)
