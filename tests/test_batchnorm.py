"""Precise BatchNorm statistics (mrisr_cli/batchnorm.py): exact averages, nothing else touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RRDG
from torch import nn

from mrisr_cli.batchnorm import (
    batchnorm_layers,
    recalibrate_batchnorm,
    recalibrate_weights_file,
    sampler_batches,
)
from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.patches import PatchOptions, PatchSampler, SubjectArrays
from mrisr_cli.weights import load_weights, save_weights


def test_running_statistics_become_the_average_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    model[1].running_mean.fill_(5.0)  # stale values from "training"
    model[1].running_var.fill_(9.0)
    batches = [torch.randn(3, 1, 4, 5, 6) * (k + 1) + k for k in range(4)]
    model.train()
    assert recalibrate_batchnorm(model, batches) == 4
    with torch.no_grad():
        features = [model[0](b) for b in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3, 4)) for f in features]).mean(0)
    variances = torch.stack([f.var(dim=(0, 2, 3, 4), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)
    torch.testing.assert_close(model[1].running_var, variances)
    assert model.training and model[1].training  # modes and momentum as they were
    assert model[1].momentum == 0.1


def test_eval_output_matches_batch_statistics_after_recalibration() -> None:
    """The lag is gone: on the batch it was computed from, eval mode gives what training mode
    gives (up to the n/(n-1) of the stored unbiased variance)."""
    torch.manual_seed(1)
    model = build_network(TINY_RRDG)
    for layer in batchnorm_layers(model):
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.2, 3)
    x = torch.randn(4, 1, 16, 12, 16)
    with torch.no_grad():
        target = model.train()(x)
        stale = model.eval()(x)
        recalibrate_batchnorm(model, [x])
        fresh = model(x)
    assert not model.training
    stale_error = (stale - target).abs().mean().item()
    fresh_error = (fresh - target).abs().mean().item()
    assert fresh_error < 0.01 * stale_error, (fresh_error, stale_error)


def test_networks_without_batchnorm_are_left_alone() -> None:
    model = build_network(NetworkConfig("fsrcnn", {"d": 4, "s": 2, "m": 1}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, [torch.randn(1, 1, 8, 8, 8)]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(build_network(TINY_RRDG), [])


def synthetic_sampler(seed: int = 0) -> PatchSampler:
    rng = np.random.default_rng(0)
    hr = rng.normal(0, 1, (24, 20, 24)).astype(np.float32)
    mask = np.zeros(hr.shape, np.uint8)
    mask[4:20, 4:16, 4:20] = 1
    centres = np.argwhere(mask[::4, ::4, ::4]) * 4
    subject = SubjectArrays("sub-01", hr, 0.5 * hr, mask, centres.astype(np.int16))
    return PatchSampler([subject], PatchOptions((16, 12, 16), 0.9, (0, 1, 2)), seed=seed)


def test_recalibration_batches_are_fixed_and_not_training_draws() -> None:
    sampler = synthetic_sampler()
    first = list(sampler_batches(sampler, 5, 2, "cpu"))
    again = list(sampler_batches(sampler, 5, 2, "cpu"))
    assert len(first) == 3 and all(b.shape == (2, 1, 16, 12, 16) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    training_draw = torch.from_numpy(sampler.batch((0, 0), 2)[0])
    assert not torch.equal(first[0], training_draw)


def test_weights_file_gets_new_statistics_and_keeps_every_learned_tensor(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build_network(TINY_RRDG)
    source = tmp_path / "in.safetensors"
    save_weights(source, model.state_dict(), TINY_RRDG, DegradationConfig(), provenance={"step": 7})
    weights = load_weights(source)
    output = tmp_path / "out.safetensors"
    batches = recalibrate_weights_file(
        weights, synthetic_sampler(), output, patches=4, batch_size=2
    )
    assert batches == 2
    result = load_weights(output)
    buffers = {k for k in result.state if k.endswith(("running_mean", "running_var"))}
    assert buffers
    for key, tensor in result.state.items():
        if key in buffers:
            assert not torch.equal(tensor, weights.state[key]), key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, weights.state[key]), key
    record = result.provenance["precise_bn"]
    assert record["patches"] == 4 and record["source_sha256"] == weights.sha256
    assert result.provenance["step"] == 7


def test_recalibration_tool_writes_the_file_and_scores_it(tmp_path: Path) -> None:
    """tools/recalibrate_batchnorm.py on a prepared folder: new file, validation scores."""
    import subprocess
    import sys

    from tests.test_prepare import NO_N4, prepared_heads

    data = prepared_heads(tmp_path, 2, (0.5, 0.5, 0.0, 0.0))
    torch.manual_seed(3)
    source = tmp_path / "in.safetensors"
    save_weights(source, build_network(TINY_RRDG).state_dict(), TINY_RRDG, NO_N4.degradation)
    tool = Path(__file__).resolve().parents[1] / "tools" / "recalibrate_batchnorm.py"
    command = [sys.executable, str(tool), "--data", str(data), "--weights"]
    command += [str(source), "--out", str(tmp_path / "out.safetensors"), "--patches", "2"]
    command += ["--batch-size", "1", "--check", "1", "--threads", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "from 2 x 1 patches of 1 train subjects" in run.stdout
    scores = [line for line in run.stdout.splitlines() if "mean PSNR" in line]
    assert [line.split()[0] for line in scores] == ["input", "before", "after"]
    assert load_weights(tmp_path / "out.safetensors").provenance["precise_bn"]["patches"] == 2
