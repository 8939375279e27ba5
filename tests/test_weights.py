"""Weights files: safetensors + metadata, and every way a file can be wrong."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import NO_N4, TINY_RRDG, tiny_weights
from safetensors.torch import save_file

from mrisr_cli.blending import blend_states, blend_weights
from mrisr_cli.errors import MrisrError, WeightsError
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.weights import load_weights, save_weights


def test_round_trip_keeps_tensors_network_and_degradation(tmp_path: Path) -> None:
    """Every tensor read back equals the one written (BN statistics included), and the rebuilt
    network computes what the saved one did."""
    torch.manual_seed(0)
    saved = build_network(TINY_RRDG)
    for module in saved.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "w.safetensors"
    save_weights(path, saved.state_dict(), TINY_RRDG, NO_N4)
    loaded = load_weights(path)
    assert loaded.network == TINY_RRDG
    assert loaded.degradation == NO_N4
    expected = saved.state_dict()
    assert loaded.state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded.state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded.state[name], tensor), name
    x = torch.randn(1, 1, 12, 10, 12)
    with torch.no_grad():
        assert torch.equal(loaded.build()(x), saved.eval()(x))
    assert len(loaded.sha256) == 64


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path: Path) -> None:
    """safetensors orders the metadata as a hash map does, differently from save to save:
    best and last of one step differed in sha256, and upsample then warned that a GAN model
    tuned from one was "fine-tuned from another model" than the other."""
    torch.manual_seed(0)
    state = build_network(TINY_RRDG).state_dict()
    provenance = {"stage": "psnr", "step": 4, "path": "run/Grün/best.safetensors"}
    paths = [tmp_path / f"w{i}.safetensors" for i in range(6)]
    for path in paths:
        save_weights(path, state, TINY_RRDG, NO_N4, provenance=provenance)
    assert len({path.read_bytes() for path in paths}) == 1
    loaded = load_weights(paths[0])
    assert all(torch.equal(loaded.state[k], v) for k, v in state.items())
    assert loaded.provenance == provenance


def test_pickle_is_refused_without_being_opened(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(build_network(TINY_RRDG).state_dict(), path)
    with pytest.raises(WeightsError, match="pickle"):
        load_weights(path)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(WeightsError, match="pickle"):
        load_weights(raw)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tiny_weights(tmp_path / "w.safetensors", seed=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_weights(path)


def test_foreign_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="not mrisr weights"):
        load_weights(path)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path = tiny_weights(tmp_path / "w.safetensors", seed=0)
    with pytest.raises(WeightsError, match="expected 'fsrcnn'"):
        load_weights(path, expect_network="fsrcnn")
    # tensors that do not fit the config they claim
    fsrcnn = build_network(NetworkConfig("fsrcnn", {}))
    lying = tmp_path / "lying.safetensors"
    save_weights(lying, fsrcnn.state_dict(), TINY_RRDG, NO_N4)
    with pytest.raises(WeightsError, match="do not fit network 'rrdg'") as err:
        load_weights(lying).build()
    assert "missing, e.g. conv_first.weight" in str(err.value)  # the mismatch, named
    state = build_network(TINY_RRDG).state_dict()
    state["conv_last.weight"] = torch.zeros(2, 4, 3, 3, 3)
    misshaped = tmp_path / "misshaped.safetensors"
    save_weights(misshaped, state, TINY_RRDG, NO_N4)
    with pytest.raises(WeightsError, match=r"conv_last.weight \(2, 4, 3, 3, 3\) instead of"):
        load_weights(misshaped).build()


def test_a_file_asking_for_a_huge_network_is_refused_before_it_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metadata say 20,000 features (a network of gigabytes) beside a tiny network's tensors: the
    mismatch is found on the meta device, and no real network is ever allocated."""
    huge = NetworkConfig("rrdg", {**TINY_RRDG.params, "features": 20000})
    path = tmp_path / "huge.safetensors"
    save_weights(path, build_network(TINY_RRDG).state_dict(), huge, NO_N4)
    import mrisr_cli.weights as weights_module

    devices: list[torch.device] = []

    def recording_build(config: NetworkConfig) -> torch.nn.Module:
        devices.append(torch.empty(0).device)  # the default device the network is built on
        return build_network(config)

    monkeypatch.setattr(weights_module, "build_network", recording_build)
    with pytest.raises(WeightsError, match=r"conv_first.weight \(4, 1, 3, 3, 3\) instead of"):
        load_weights(path).build()
    assert devices == [torch.device("meta")]


def test_non_finite_tensors_are_refused(tmp_path: Path) -> None:
    state = build_network(TINY_RRDG).state_dict()
    state["conv_first.bias"][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_weights(path, state, TINY_RRDG, NO_N4)
    with pytest.raises(WeightsError, match=r"1 tensor\(s\) hold NaN or infinite values"):
        load_weights(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "nope.safetensors")


def test_blending_end_points_reproduce_each_model_exactly(
    psnr_weights: Path, gan_weights: Path
) -> None:
    psnr, gan = load_weights(psnr_weights), load_weights(gan_weights)
    x = torch.randn(2, 1, 14, 10, 12)
    with torch.no_grad():
        out_psnr = psnr.build()(x)
        out_gan = gan.build()(x)
        assert torch.equal(blend_weights(psnr, gan, 1.0).build()(x), out_psnr)
        assert torch.equal(blend_weights(psnr, gan, 0.0).build()(x), out_gan)
        middle = blend_weights(psnr, gan, 0.5).build()(x)
    assert not torch.equal(middle, out_psnr) and not torch.equal(middle, out_gan)


def test_blending_covers_batchnorm_buffers(psnr_weights: Path, gan_weights: Path) -> None:
    psnr, gan = load_weights(psnr_weights), load_weights(gan_weights)
    blended = blend_states(psnr.state, gan.state, 0.25)
    name = next(k for k in psnr.state if k.endswith("running_mean"))
    expected = 0.25 * psnr.state[name] + 0.75 * gan.state[name]
    assert torch.allclose(blended[name], expected)
    counter = next(k for k in psnr.state if k.endswith("num_batches_tracked"))
    assert torch.equal(blended[counter], psnr.state[counter])


def test_blending_refuses_different_networks_and_bad_alpha(
    tmp_path: Path, psnr_weights: Path
) -> None:
    other = tiny_weights(
        tmp_path / "other.safetensors",
        3,
        NetworkConfig("rrdg", {"features": 6, "blocks": 1, "growth": 2}),
    )
    with pytest.raises(WeightsError, match="different networks"):
        blend_weights(load_weights(psnr_weights), load_weights(other), 0.5)
    with pytest.raises(MrisrError, match=r"\[0, 1\]"):
        blend_states({}, {}, 1.5)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("n4", "false"),
        ("factor", 2.5),
        ("factor", 1),  # degrades nothing
        ("axes", [0, 0, 2]),
        ("axes", [True, 2]),
        ("axes", []),  # degrades nothing
    ],
)
def test_degradation_settings_of_the_wrong_type_are_refused(
    tmp_path: Path, key: str, value: object
) -> None:
    """``"n4": "false"`` is a non-empty string: read as is, it meant N4 on."""
    import json

    from mrisr_cli.weights import read_metadata

    good = tiny_weights(tmp_path / "good.safetensors", seed=0)
    metadata = read_metadata(good)
    settings = json.loads(metadata["degradation"])
    settings[key] = value
    metadata["degradation"] = json.dumps(settings)
    bad = tmp_path / "bad.safetensors"
    save_file(load_weights(good).state, str(bad), metadata=metadata)
    with pytest.raises(WeightsError, match="degradation settings are not readable") as caught:
        load_weights(bad)
    assert str(caught.value).startswith(f"{bad}: ")  # the file is named


@pytest.mark.parametrize(
    ("network", "needle"),
    [
        ("not json", "network configuration is not readable"),
        ('{"name": "unet", "params": {}}', "unknown network 'unet'"),
    ],
)
def test_unreadable_network_settings_name_the_file(
    tmp_path: Path, network: str, needle: str
) -> None:
    from mrisr_cli.weights import read_metadata

    good = tiny_weights(tmp_path / "good.safetensors", seed=0)
    metadata = {**read_metadata(good), "network": network}
    bad = tmp_path / "bad.safetensors"
    save_file(load_weights(good).state, str(bad), metadata=metadata)
    with pytest.raises(WeightsError, match=needle) as caught:
        load_weights(bad).build()
    assert str(caught.value).startswith(f"{bad}: ")
