"""Networks: parameter counts against the paper's Table 1, shapes, checkpointing, registry."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrisr_cli.errors import WeightsError
from mrisr_cli.networks import NetworkConfig, build_network, count_parameters
from mrisr_cli.networks.discriminator import PatchDiscriminator
from mrisr_cli.networks.fsrcnn import FSRCNN3D
from mrisr_cli.networks.mdcsrn import MDCSRN
from mrisr_cli.networks.rrdg import RRDG
from mrisr_cli.networks.srresnet import SRResNet3D

# network name -> (paper's #param, allowed relative difference)
PAPER_COUNTS: dict[str, tuple[int, float]] = {
    "rrdg": (2_650_129, 0.0),
    "fsrcnn": (64_893, 0.0),
    "srresnet": (2_004_620, 0.05),
    "mdcsrn": (625_969, 0.05),
}

SHAPE = (2, 1, 12, 10, 12)


def test_parameter_counts_match_the_paper() -> None:
    rows = []
    for name, (paper, tolerance) in PAPER_COUNTS.items():
        ours = count_parameters(build_network(NetworkConfig(name, {})))
        rows.append((name, ours, paper, (ours - paper) / paper, tolerance))
    print()
    print(f"{'network':<10} {'ours':>11} {'paper':>11} {'rel. diff':>10}")
    for name, ours, paper, rel, _ in rows:
        print(f"{name:<10} {ours:>11,} {paper:>11,} {rel:>+10.3%}")
    for name, ours, paper, rel, tolerance in rows:
        assert abs(rel) <= tolerance, f"{name}: {ours:,} parameters vs the paper's {paper:,}"


def _authors_rrdg(model: RRDG, x: torch.Tensor) -> torch.Tensor:
    """The authors' RRDBGenerator forward (eval mode), written out with the model's tensors:
    conv-BN-LeakyReLU(0.2) x4 then conv-BN without activation, dense concatenation, residual
    scale 0.2 in every dense block and RRDB, trunk conv + BN, the global feature residual, then
    conv, LeakyReLU, conv to one channel."""

    def conv(layer: nn.Conv3d, t: torch.Tensor) -> torch.Tensor:
        return F.conv3d(t, layer.weight, layer.bias, padding=1)

    def bn(layer: nn.BatchNorm3d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            t, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, 1e-5
        )

    def dense_block(block: nn.Module, t: torch.Tensor) -> torch.Tensor:
        inputs = [t]
        for i in range(5):
            out = bn(block.norms[i], conv(block.convs[i].conv, torch.cat(inputs, 1)))
            if i < 4:
                inputs.append(F.leaky_relu(out, 0.2))
        return t + 0.2 * out

    features = conv(model.conv_first, x)
    trunk = features
    for rrdb in model.rrdbs:
        inner = trunk
        for block in rrdb.dense_blocks:
            inner = dense_block(block, inner)
        trunk = trunk + 0.2 * inner
    trunk = bn(model.trunk_norm, conv(model.trunk_conv, trunk))
    return conv(model.conv_last, F.leaky_relu(conv(model.conv_hr, features + trunk), 0.2))


def test_rrdg_computes_the_authors_layout() -> None:
    torch.manual_seed(0)
    model = RRDG(features=8, blocks=2, growth=4).eval()
    for module in model.modules():  # statistics away from 0/1, so BatchNorm placement matters
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 1, 10, 8, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _authors_rrdg(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: RRDG(blocks=1), id="rrdg-1-block"),
        pytest.param(lambda: FSRCNN3D(), id="fsrcnn"),
        pytest.param(lambda: SRResNet3D(features=16, blocks=2), id="srresnet-small"),
        pytest.param(lambda: MDCSRN(blocks=3), id="mdcsrn-3-blocks"),
    ],
)
def test_generator_keeps_the_shape(model) -> None:
    torch.manual_seed(0)
    net = model().eval()
    with torch.no_grad():
        out = net(torch.randn(SHAPE))
    assert out.shape == SHAPE
    assert torch.isfinite(out).all()


def test_rrdg_checkpointing_changes_nothing() -> None:
    torch.manual_seed(0)
    model = RRDG(features=8, blocks=1, growth=4).train()
    x = torch.randn(SHAPE)

    def run(enabled: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.set_checkpointing(enabled)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_out, plain_out, rtol=1e-5, atol=1e-5)
    for ckpt, plain in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_discriminator_scores_each_sample(norm: str) -> None:
    disc = build_network(NetworkConfig("patch_discriminator", {"norm": norm}))
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    assert not any(isinstance(m, batch_norms) for m in disc.modules())
    batch = torch.randn(2, 1, 16, 16, 16)
    out = disc(batch)
    assert out.shape == (2,)
    assert isinstance(disc, PatchDiscriminator)
    changed = batch.clone()
    changed[1] = torch.randn(1, 16, 16, 16)  # per-sample norms: sample 0's score stays put
    again = disc(changed)
    torch.testing.assert_close(again[0], out[0])
    assert not torch.allclose(again[1], out[1])


def test_discriminator_takes_training_patches() -> None:
    disc = PatchDiscriminator(base_features=4, plain_layers=1)
    assert disc(torch.randn(1, 1, 64, 40, 64)).shape == (1,)


@pytest.mark.parametrize(
    "config",
    [
        NetworkConfig("esrgan", {}),
        NetworkConfig("rrdg", {"nf": 48}),
        NetworkConfig("fsrcnn", {"d": 56, "colour": True}),
    ],
    ids=["unknown-name", "unknown-param", "extra-param"],
)
def test_build_network_rejects_bad_configs(config: NetworkConfig) -> None:
    with pytest.raises(WeightsError):
        build_network(config)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"features": 0}, "features must be a whole number of at least 1 (got 0)"),
        ({"growth": 0}, "growth must be a whole number of at least 1 (got 0)"),
        ({"blocks": -1}, "blocks must be a whole number of at least 0 (got -1)"),
        ({"features": "x"}, "features must be a whole number of at least 1 (got 'x')"),
        ({"features": 8.0}, "features must be a whole number"),
        ({"residual_scale": float("nan")}, "residual_scale must be a finite number"),
    ],
)
def test_hyper_parameters_are_checked_before_the_network_is_built(
    params: dict[str, object], needle: str
) -> None:
    """A size of 0 built with torch's multi-line warning and failed later, -1 blocks built a
    network without blocks (and weights that said -1), "x" failed with a format error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match=re.escape(needle)):
            build_network(NetworkConfig("rrdg", {"features": 8, "growth": 4, **params}))
