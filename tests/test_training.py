"""`mrisr train`: CPU smoke run on two real volumes, resume equivalence, DDP, WGAN-GP, bad input.

The real volumes come from ``$MRISR_DATA`` (else ``../shared/data``); tests that need them skip
when they are absent. They are cropped to 40x36x40 voxels around the centre, so a whole
validation volume is one tile and the suite stays fast on two busy CPU cores; torch runs one
thread here, since two OpenMP threads on two shared cores wait for each other far more than they
gain.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import head_phantom, real_volume, write_nifti
from safetensors.torch import load_file
from typer.testing import CliRunner

from mrisr_cli import run_files, training, training_config
from mrisr_cli.batchnorm import recalibrate_batchnorm, sampler_batches
from mrisr_cli.cli import app
from mrisr_cli.errors import InputError, OutputError, WeightsError
from mrisr_cli.losses import critic_loss, fixed_batch_l1, interpolation_weights
from mrisr_cli.manifest import load_manifest
from mrisr_cli.metrics import image_metrics
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.patches import PatchOptions, PatchSampler, Prefetcher, SubjectArrays, open_split
from mrisr_cli.pipeline import load_generator_files
from mrisr_cli.run_files import read_checkpoint, read_log
from mrisr_cli.training import train
from mrisr_cli.training_config import TrainConfig
from mrisr_cli.weights import load_weights, save_weights

REPO = Path(__file__).resolve().parents[1]
REAL = ("S08_stroke_T1.nii.gz", "S15_antsxnet_brainSR_brainonly.nii.gz")
CROP = (40, 36, 40)
VAL_PATCH = (46, 42, 46)  # one tile holds a whole cropped volume
TINY = {"features": 4, "blocks": 1, "growth": 2}
TINY_CRITIC = {"base_features": 4, "plain_layers": 0}
PATCH = (16, 12, 16)
LOG = run_files.LOG_NAME


def invoke(*args: str | Path):
    result = CliRunner().invoke(app, [*map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def crop_centre(source: Path, target: Path, size: tuple[int, int, int]) -> None:
    """The central ``size`` voxels of a real scan, with the affine that keeps them in place."""
    image = nib.load(str(source))
    data = np.asarray(image.dataobj)
    start = np.array([(n - s) // 2 for n, s in zip(data.shape, size, strict=True)])
    block = data[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ start + image.affine[:3, 3]
    nib.save(nib.Nifti1Image(block, affine), str(target))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real T1 volumes, cropped, through `mrisr prepare` (one train, one val subject)."""
    sources = [real_volume(f"t1/{name}") for name in REAL]  # skips where one is missing
    root = tmp_path_factory.mktemp("prepared")
    (root / "src").mkdir()
    for source in sources:
        crop_centre(source, root / "src" / source.name, CROP)
    args = ["--no-n4", "--min-extent", "32", "--threads", "1"]
    result = invoke("prepare", root / "src", root / "data", *args)
    assert result.exit_code == 0, result.output
    return root


def tiny_config(data: Path, out: Path, **changes) -> TrainConfig:
    base = {
        "stage": "psnr",
        "data": str(data),
        "out": str(out),
        "network": NetworkConfig("rrdg", TINY),
        "critic": NetworkConfig("patch_discriminator", TINY_CRITIC),
        "epochs": 1,
        "steps_per_epoch": 4,
        "batch_size": 2,
        "lr": 2e-3,
        "critic_lr": 2e-3,
        "critic_steps": 2,
        "patch": PATCH,
        "val_patch": VAL_PATCH,
        "log_every": 1,
        "device": "cpu",
        "workers": 1,
    }
    base.update(changes)
    return TrainConfig(**base)


# --- WGAN-GP pieces ---------------------------------------------------------------------------


class LinearCritic(torch.nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere, so the penalty is (||w|| - 1)^2."""

    def __init__(self, shape: tuple[int, ...], norm: float) -> None:
        super().__init__()
        w = torch.randn(shape)
        self.w = torch.nn.Parameter(w / w.norm() * norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize(("norm", "penalty"), [(1.0, 0.0), (3.0, 4.0)])
def test_gradient_penalty_is_two_sided_per_sample(norm: float, penalty: float) -> None:
    shape = (1, 6, 5, 4)
    critic = LinearCritic(shape, norm)
    real, fake = torch.randn(3, *shape), torch.randn(3, *shape)
    gamma = torch.rand(3, 1, 1, 1, 1)
    loss, distance, gp = critic_loss(critic, real, fake, gamma, lambda_gp=10.0)
    assert gp.item() == pytest.approx(penalty, abs=1e-4)
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    assert loss.item() == pytest.approx((d_real - d_fake + 10 * penalty).item(), rel=1e-5)
    assert distance.item() == pytest.approx((d_fake - d_real).item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 1, 1, 1, 1\)"):
        critic_loss(critic, real, fake, torch.rand(3, 1, 1, 1), lambda_gp=10.0)


def test_generator_loss_is_l1_plus_lambda_times_the_critic_score_and_lowers_it(
    tmp_path: Path,
) -> None:
    """Paper eq. 1 with the critic's sign (eq. 2: D scores "how fake"): L_G = L1 + lambda D(sr),
    D(sr) of the generator's own output, and a step with a large lambda lowers that score."""
    lam = 50.0
    config = tiny_config(tmp_path / "data", tmp_path / "run", stage="gan", lambda_adv=lam)
    trainer = training.Trainer(config)
    critic = LinearCritic((1, *PATCH), norm=1.0)
    trainer.critic = trainer.d_train = critic
    torch.manual_seed(1)
    lr, hr = torch.randn(2, 1, *PATCH), torch.randn(2, 1, *PATCH)
    for group in trainer.opt_g.param_groups:
        group["lr"] = 0.0  # first the loss's value, with the weights left as they are
    sr = trainer.generator(lr).detach()
    values = trainer.generator_step(lr, hr)
    l1 = torch.nn.functional.l1_loss(sr, hr)
    assert values["g_adv"].item() == pytest.approx(critic(sr).mean().item(), rel=1e-5)
    assert values["g_loss"].item() == pytest.approx((l1 + lam * critic(sr).mean()).item(), rel=1e-5)
    for group in trainer.opt_g.param_groups:
        group["lr"] = 1e-3
    before = values["g_adv"].item()
    trainer.generator_step(lr, hr)
    after = trainer.generator_step(lr, hr)["g_adv"].item()
    assert after < before
    assert all(p.requires_grad for p in critic.parameters())  # unfrozen after the step


def test_the_library_defaults_keep_the_clis_critic_to_generator_lr_ratio() -> None:
    config = TrainConfig("gan", "data", "out")
    assert config.critic_lr == pytest.approx(training_config.CRITIC_LR_PER_LR * config.lr)


def test_learning_rates_decay_by_lr_decay_every_lr_decay_steps(tmp_path: Path) -> None:
    """Step decay: x lr_decay after every lr_decay_steps steps, for both optimisers."""
    config = tiny_config(
        tmp_path / "data", tmp_path / "run", stage="gan", lr_decay=0.5, lr_decay_steps=3
    )
    factors = [training._lr_factor(config, step) for step in range(8)]
    assert factors == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    trainer = training.Trainer(config)
    assert trainer.opt_d is not None
    for step, factor in ((7, 0.25), (3, 0.5), (0, 1.0)):
        trainer.set_step_lr(step)
        assert [g["lr"] for g in trainer.opt_g.param_groups] == pytest.approx(
            [config.lr * factor] * len(trainer.opt_g.param_groups)
        )
        assert [g["lr"] for g in trainer.opt_d.param_groups] == pytest.approx(
            [config.critic_lr * factor] * len(trainer.opt_d.param_groups)
        )


def test_gradient_penalty_uses_each_samples_own_interpolate() -> None:
    """With a critic whose gradient depends on its input, a wrong broadcast changes the value."""
    critic = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten())
    wrapped = torch.nn.Sequential(critic, torch.nn.Linear(2 * 2 * 3 * 2, 1), torch.nn.Flatten(0))
    real, fake = torch.randn(4, 1, 4, 5, 4), torch.randn(4, 1, 4, 5, 4)
    gamma = torch.tensor([0.0, 0.3, 0.7, 1.0]).reshape(4, 1, 1, 1, 1)
    _, _, gp = critic_loss(wrapped, real, fake, gamma, lambda_gp=1.0)
    expected = []
    for i in range(4):
        x = (gamma[i] * fake[i : i + 1] + (1 - gamma[i]) * real[i : i + 1]).requires_grad_(True)
        (grad,) = torch.autograd.grad(wrapped(x).sum(), x)
        expected.append((grad.norm() - 1) ** 2)
    assert gp.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_interpolation_weights_split_into_rank_slices() -> None:
    whole = interpolation_weights(7, (3, 1), 6, 0, 6)
    assert whole.shape == (6, 1, 1, 1, 1) and whole.min() >= 0 and whole.max() < 1
    parts = [interpolation_weights(7, (3, 1), 6, r * 3, 3) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(interpolation_weights(7, (3, 2), 6, 0, 6), whole)


# --- patches ----------------------------------------------------------------------------------


def test_patch_sampler_is_a_function_of_the_key(prepared: Path) -> None:
    manifest = load_manifest(prepared / "data")
    subjects = open_split(manifest, "train")
    sampler = PatchSampler(subjects, PatchOptions(PATCH, 0.9, (0, 1, 2)), seed=5)
    lr, hr = sampler.batch((4, 0), 4)
    assert lr.shape == hr.shape == (4, 1, *PATCH) and lr.dtype == np.float32
    halves = [sampler.batch((4, 0), 2, offset=o) for o in (0, 2)]
    assert np.array_equal(np.concatenate([h[0] for h in halves]), lr)
    assert np.array_equal(np.concatenate([h[1] for h in halves]), hr)
    assert not np.array_equal(sampler.batch((5, 0), 4)[1], hr)
    # a patch is the crop at its draw's origin, flipped along the drawn axes
    where = sampler.draw((4, 0), 1)
    block = tuple(slice(s, s + n) for s, n in zip(where.start, PATCH, strict=True))
    expected = np.asarray(subjects[where.subject].hr[block], dtype=np.float32)
    assert np.array_equal(hr[1, 0], np.flip(expected, where.flips))
    with Prefetcher(lambda key: sampler.batch(key, 2), [(s, 0) for s in range(5)], depth=2) as it:
        batches = list(it)
    assert len(batches) == 5 and np.array_equal(batches[4][1], sampler.batch((4, 0), 2)[1])


def test_patches_come_mostly_from_the_foreground() -> None:
    shape = (60, 50, 60)
    mask = np.zeros(shape, np.uint8)
    mask[10:25, 30:45, 35:50] = 1  # about 4% of the volume
    centres = (np.argwhere(mask[::4, ::4, ::4]) * 4).astype(np.int16)
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float16)
    subject = SubjectArrays("s", volume, volume, mask, centres)

    def inside(fraction: float) -> float:
        sampler = PatchSampler([subject], PatchOptions(PATCH, fraction, ()), seed=0)
        draws = [sampler.draw((0, 0), i) for i in range(300)]
        return float(np.mean([mask[d.centre] for d in draws]))

    assert inside(1.0) > 0.9
    assert inside(0.9) > 0.8
    assert inside(0.0) < 0.15


# --- the CPU smoke run ------------------------------------------------------------------------


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--net-params",
        json.dumps(TINY),
        "--critic-params",
        json.dumps(TINY_CRITIC),
        "--patch",
        ",".join(map(str, PATCH)),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--log-every",
        "1",
        "--val-patch",
        ",".join(map(str, VAL_PATCH)),
        "--threads",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def psnr_run(prepared: Path) -> Path:
    """A few PSNR steps of a tiny RRDG through `mrisr train` (2 epochs of 4 steps)."""
    out = prepared / "psnr"
    args = ["--stage", "psnr", "--epochs", "2", "--steps-per-epoch", "4", "--lr", "3e-3"]
    result = invoke(*train_args(prepared / "data", out, *args))
    assert result.exit_code == 0, result.output
    return out


def test_smoke_psnr_then_gan_then_upsample(prepared: Path, psnr_run: Path) -> None:
    data = prepared / "data"
    records = read_log(psnr_run / LOG)
    steps = [r for r in records if r["event"] == "train"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 9)) and len(epochs) == 2
    assert all(np.isfinite(r["l1"]) for r in steps)
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 and r["val_psnr"] > 0 for r in epochs)

    # the loss on one fixed batch went down: the first model vs the trained one
    sampler = PatchSampler(open_split(load_manifest(data), "train"), PatchOptions(PATCH), seed=123)
    lr, hr = (torch.from_numpy(a) for a in sampler.batch((0, 0), 4))
    torch.manual_seed(0)  # the trainer's initialisation (seed 0)
    before = fixed_batch_l1(build_network(NetworkConfig("rrdg", TINY)), lr, hr)
    after = fixed_batch_l1(load_weights(psnr_run / "last.safetensors").build(), lr, hr)
    print(f"fixed-batch L1: {before:.4f} before training, {after:.4f} after 8 PSNR steps")
    assert after < 0.8 * before, (before, after)

    # GAN stage from the PSNR weights
    gan = prepared / "gan"
    args = ["--stage", "gan", "--init", psnr_run / "best.safetensors", "--epochs", "1"]
    more = ["--steps-per-epoch", "3", "--critic-steps", "2", "--critic-warmup", "1"]
    gan_args = train_args(data, gan, *map(str, args), *more)
    at = gan_args.index("--net-params")  # the network comes from --init, as users run it
    del gan_args[at : at + 2]
    result = invoke(*gan_args)
    assert result.exit_code == 0, result.output
    summary = " ".join(result.output.split())  # this call's time, and where the best model is
    assert re.search(
        r"done: 3 of 3 steps in \d+ s; best validation PSNR [\d.]+ dB \(step 3\)", summary
    )
    gan_steps = [r for r in read_log(gan / LOG) if r["event"] == "train"]
    assert "g_adv" not in gan_steps[0] and "d_loss" in gan_steps[0]  # critic warm-up
    assert all(np.isfinite(gan_steps[-1][k]) for k in ("d_loss", "gp", "g_adv", "l1"))
    weights = load_weights(gan / "last.safetensors", expect_network="rrdg")
    provenance = weights.provenance
    assert provenance["stage"] == "gan" and provenance["step"] == 3
    assert provenance["init"]["sha256"] == load_weights(psnr_run / "best.safetensors").sha256
    assert provenance["data_manifest_sha256"] == load_manifest(data).sha256
    assert provenance["config"]["lambda_adv"] == 0.1 and provenance["git_commit"]
    assert weights.degradation == load_manifest(data).degradation

    # both weights files go straight into `mrisr upsample`
    source = prepared / "src" / REAL[1]
    result = invoke(
        "upsample",
        source,
        prepared / "sr.nii.gz",
        "--psnr-weights",
        psnr_run / "best.safetensors",
        "--gan-weights",
        gan / "last.safetensors",
        "--alpha",
        "0.5",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    out = nib.load(str(prepared / "sr.nii.gz"))
    assert out.shape == CROP and np.isfinite(np.asarray(out.dataobj)).all()


# --- validation against the input -------------------------------------------------------------


def input_scores_by_hand(data: Path) -> dict[str, float]:
    """The validation inputs scored as the prediction, subject by subject, and averaged."""
    rows = [
        image_metrics(
            np.asarray(s.hr, dtype=np.float32),
            np.asarray(s.lr, dtype=np.float32),
            np.asarray(s.mask, dtype=bool),
        ).as_dict()
        for s in open_split(load_manifest(data), "val")
    ]
    return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


def test_validation_shows_the_input_s_own_score_computed_once_per_call(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validation PSNR alone does not say whether the model beats its input: each validation
    line and log record also give the inputs' own scores, computed once per call. An untrained
    network's early validations, more than 10 dB below the input, are not warned about."""
    data, out = prepared / "data", tmp_path / "run"
    expected = input_scores_by_hand(data)
    calls: list[int] = []
    scores = training.input_scores
    monkeypatch.setattr(training, "input_scores", lambda *a: calls.append(1) or scores(*a))
    args = ["--stage", "psnr", "--epochs", "2", "--steps-per-epoch", "1"]  # the default --lr
    result = invoke(*train_args(data, out, *args))
    assert result.exit_code == 0, result.output
    assert calls == [1]  # two validations, one scoring of the inputs
    text = " ".join(result.output.split())
    assert "warning" not in text, text
    lines = re.findall(r"val PSNR (-?[\d.]+) dB \(input ([\d.]+) dB, ([+-][\d.]+)\) SSIM", text)
    assert len(lines) == 2, text
    for psnr, given, gain in lines:
        assert given == f"{expected['psnr']:.2f}"
        assert float(gain) == pytest.approx(float(psnr) - expected["psnr"], abs=0.011)
    assert re.search(rf"\(step \d\), input {expected['psnr']:.2f} dB; weights:", text), text
    epochs = [r for r in read_log(out / LOG) if r["event"] == "epoch"]
    for record in epochs:
        assert {k: record[f"input_{k}"] for k in expected} == pytest.approx(expected, rel=1e-6)
        assert {f"val_{k}" for k in expected} <= set(record)  # the model's keys as before
    # the case the rule is for: a fresh network far below the input is not a diverged one
    assert expected["psnr"] - epochs[0]["val_psnr"] > 10, epochs[0]
    assert read_log(out / LOG)[-1]["input_psnr"] == pytest.approx(expected["psnr"])

    args[args.index("--epochs") + 1] = "3"
    resumed = invoke(*train_args(data, out, *args, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert calls == [1, 1]  # once more for the resumed call
    assert f"(input {expected['psnr']:.2f} dB," in " ".join(resumed.output.split())


@pytest.mark.parametrize(
    ("psnr", "input_psnr", "far"),
    [
        (12.39, 22.74, False),  # measured: a fresh tiny RRDG at step 1, the test crops
        (9.36, 30.25, False),  # an untrained one on whole real volumes (S08, S18)
        (14.30, 41.89, False),
        (20.0, 22.74, False),
        (-1.06, 22.74, True),  # --lr 0.1, first validation
        (-119.84, 22.74, True),  # --lr 10
        (-5.0, 3.0, False),  # below 0 dB but not 10 below the input
        (math.nan, 22.74, True),
    ],
)
def test_which_validations_count_as_far_below_the_input(
    psnr: float, input_psnr: float, far: bool
) -> None:
    assert training.far_below_input(psnr, input_psnr) is far


def test_a_diverged_run_is_warned_about_once(prepared: Path, tmp_path: Path) -> None:
    """--lr 10 trained on to a "best" validation PSNR of about -134 dB without a word (now
    refused: at most 1; --lr 1 diverges as surely, to -61 to -89 dB)."""
    warnings: list[str] = []

    def on_event(kind: str, payload: dict) -> None:
        if kind == "warning":
            warnings.append(payload["message"])

    config = tiny_config(prepared / "data", tmp_path / "run", lr=1.0, epochs=2, steps_per_epoch=2)
    assert train(config, on_event=on_event).status == "done"
    epochs = [r for r in read_log(tmp_path / "run" / LOG) if r["event"] == "epoch"]
    assert [r["step"] for r in epochs] == [2, 4] and all(r["val_psnr"] < 0 for r in epochs)
    assert len(warnings) == 1, warnings  # not at every validation
    assert "at step 2 is far below the input's" in warnings[0] and "--lr (now 1)" in warnings[0]


# --- resume -----------------------------------------------------------------------------------


def interrupt_at(step: int):
    """An event callback that presses Ctrl-C (a real SIGINT) once ``step`` is done."""

    def on_event(kind: str, payload: dict) -> None:
        if kind == "step" and payload["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    return on_event


@pytest.mark.parametrize("stage", ["psnr", "gan"])
def test_resume_continues_bit_for_bit(prepared: Path, tmp_path: Path, stage: str) -> None:
    init = None
    if stage == "gan":
        torch.manual_seed(1)
        init = tmp_path / "init.safetensors"
        net = NetworkConfig("rrdg", TINY)
        save_weights(
            init, build_network(net).state_dict(), net, load_manifest(prepared / "data").degradation
        )
    extra = {"stage": stage, "init": str(init) if init else None, "critic_warmup": 1}
    straight = train(tiny_config(prepared / "data", tmp_path / "a", **extra))
    assert straight.status == "done" and straight.step == 4

    config = tiny_config(prepared / "data", tmp_path / "b", **extra)
    first = train(config, on_event=interrupt_at(1))  # in step 1's event: stops at step 1
    assert first.status == "interrupted" and first.step == 1  # mid-epoch
    assert read_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 1
    assert not (tmp_path / "b" / "last.safetensors").exists()
    second = training.resume(config)
    assert second.status == "done" and second.step == 4

    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"resume equivalence ({stage}): max abs weight difference {diff}")
    assert diff == 0.0
    losses = [
        [
            {k: v for k, v in r.items() if k != "time"}
            for r in read_log(p / LOG)
            if r["event"] == "train"
        ]
        for p in (tmp_path / "a", tmp_path / "b")
    ]
    assert losses[0] == losses[1]
    if stage == "gan":
        ca, cb = (
            read_checkpoint(p / "checkpoint.pt")["state"] for p in (tmp_path / "a", tmp_path / "b")
        )
        assert all(torch.equal(ca["critic"][k], cb["critic"][k]) for k in ca["critic"])


def test_time_limit_ends_a_call_with_validated_weights_and_resume_finishes_the_run(
    prepared: Path, tmp_path: Path
) -> None:
    """A budgeted call (--time-limit, as on a lent GPU or a SLURM slot) stops after the step that
    crosses the limit, validates, exports weights, checkpoints; --resume does the rest, and the
    result equals one uninterrupted run."""
    train(tiny_config(prepared / "data", tmp_path / "a"))
    config = tiny_config(prepared / "data", tmp_path / "b", time_limit=1e-9)
    first = train(config)
    assert first.status == "time-limit" and first.step == 1
    assert first.last_weights is not None and first.last_weights.is_file()
    provenance = load_weights(first.last_weights).provenance
    assert provenance["step"] == 1
    assert read_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 1
    records = read_log(tmp_path / "b" / LOG)
    assert [r["event"] for r in records][-2:] == ["epoch", "time-limit"]
    assert provenance["epoch"] == records[-2]["epoch"] == 1  # the epoch step 1 fell in
    second = training.resume(replace(config, time_limit=0.0))
    assert second.status == "done" and second.step == 4
    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="time-limit"):
        tiny_config(prepared / "data", tmp_path / "c", time_limit=-1.0)


def train_records(out: Path) -> list[dict]:
    return [r for r in read_log(out / LOG) if r["event"] == "train"]


def assert_same_records(straight: list[dict], other: list[dict]) -> None:
    """The same steps and epochs exactly, the same losses and lr to rounding."""
    assert [(r["step"], r["epoch"]) for r in other] == [(r["step"], r["epoch"]) for r in straight]
    for a, b in zip(straight, other, strict=True):
        numbers = {k: v for k, v in a.items() if k not in ("event", "time", "step", "epoch")}
        assert set(numbers) == set(b) - {"event", "time", "step", "epoch"}
        assert {k: b[k] for k in numbers} == pytest.approx(numbers, rel=1e-12, abs=0)


@pytest.mark.parametrize("stop", ["ctrl-c", "time-limit"])
def test_a_resumed_run_logs_the_losses_of_an_uninterrupted_one(
    prepared: Path, tmp_path: Path, stop: str
) -> None:
    """With --log-every 3 and a stop after step 2, the record at step 3 averaged step 3 alone
    (steps 1 and 2 were in no record): the checkpoint now carries the partial window. One of
    an earlier version, without it, still resumes, its window empty."""
    config = tiny_config(prepared / "data", tmp_path / "a", log_every=3, precise_bn=2)
    train(config)
    straight = train_records(tmp_path / "a")
    assert [r["step"] for r in straight] == [3, 4]

    out = tmp_path / "b"
    if stop == "ctrl-c":
        first = train(replace(config, out=str(out)), on_event=interrupt_at(2))
    else:  # the first step is past the limit: stops after step 1, with a window of one step
        first = train(replace(config, out=str(out), time_limit=1e-9))
    expected = ("interrupted", 2) if stop == "ctrl-c" else ("time-limit", 1)
    assert (first.status, first.step) == expected
    old = tmp_path / "old"
    shutil.copytree(out, old)
    checkpoint = read_checkpoint_raw(old / "checkpoint.pt")
    assert checkpoint["log_window"]["steps"] == first.step
    del checkpoint["log_window"]  # as an earlier version wrote it
    torch.save(checkpoint, old / "checkpoint.pt")

    assert training.resume(replace(config, out=str(out))).status == "done"
    assert_same_records(straight, train_records(out))
    assert training.resume(replace(config, out=str(old))).status == "done"
    assert [r["step"] for r in train_records(old)] == [3, 4]


def test_each_resume_is_recorded_in_run_json(prepared: Path, tmp_path: Path) -> None:
    """run.json was written for a new run only: a run resumed on another machine, torch
    version, commit or number of processes recorded none of it."""
    out = tmp_path / "run"
    config = tiny_config(prepared / "data", out, steps_per_epoch=3)
    assert train(config, on_event=interrupt_at(1)).status == "interrupted"
    first = json.loads((out / "run.json").read_text())
    assert "resumes" not in first
    started = time.time()
    assert training.resume(replace(config, time_limit=1e-9)).step == 2
    assert training.resume(config).status == "done"
    record = json.loads((out / "run.json").read_text())
    assert {k: record[k] for k in first} == first  # the start's record as it was
    resumes = record["resumes"]
    assert [entry["step"] for entry in resumes] == [1, 2]
    for entry in resumes:
        assert entry["world_size"] == 1 and entry["device"] == "cpu"
        assert entry["torch_version"] == torch.__version__ and entry["mrisr_version"]
        assert entry["git_commit"] == run_files.git_commit()
        when = datetime.fromisoformat(entry["time"])
        assert when.utcoffset() == timedelta(0)
        assert started - 1 <= when.timestamp() <= time.time() + 1
    assert not [p for p in out.iterdir() if ".part" in p.name]

    # a run.json that is not JSON any more is left alone: the resume goes on, and says so
    (out / "run.json").write_text("{ edited")
    warnings: list[str] = []

    def on_event(kind: str, payload: dict) -> None:
        if kind == "warning":
            warnings.append(payload["message"])

    more = training.resume(replace(config, epochs=2), on_event=on_event)
    assert more.status == "done" and (out / "run.json").read_text() == "{ edited"
    assert any("this resume is not recorded" in w for w in warnings), warnings


def test_checkpoint_every_saves_between_epochs(prepared: Path, tmp_path: Path) -> None:
    """A process killed mid-epoch (here: an exception after step 3 of 4) loses at most
    --checkpoint-every steps; without it, nothing of the epoch is saved."""

    def crash_after(step: int):
        def on_event(kind: str, payload: dict) -> None:
            if kind == "step" and payload["step"] == step:
                raise RuntimeError("node lost")

        return on_event

    every = tiny_config(prepared / "data", tmp_path / "every", checkpoint_every=2)
    with pytest.raises(RuntimeError, match="node lost"):
        train(every, on_event=crash_after(3))
    assert read_checkpoint(tmp_path / "every" / "checkpoint.pt")["step"] == 2
    assert training.resume(every).step == 4
    plain = tiny_config(prepared / "data", tmp_path / "plain")
    with pytest.raises(RuntimeError, match="node lost"):
        train(plain, on_event=crash_after(3))
    assert not (tmp_path / "plain" / "checkpoint.pt").exists()


def test_resume_without_net_params_continues_the_run_s_own_network(
    prepared: Path, tmp_path: Path
) -> None:
    """`mrisr train ... --resume` need not repeat --net-params: the run's folder knows them
    (without that, the default full-size RRDG would not fit the checkpoint)."""
    out = tmp_path / "run"
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "2"]
    assert invoke(*train_args(prepared / "data", out, *args)).exit_code == 0
    resumed = train_args(prepared / "data", out, "--stage", "psnr", "--epochs", "2")
    at = resumed.index("--net-params")
    del resumed[at : at + 2]
    result = invoke(*resumed, "--steps-per-epoch", "2", "--resume")
    assert result.exit_code == 0, result.output
    weights = load_weights(out / "last.safetensors")
    assert weights.network.params == TINY and weights.provenance["step"] == 4


def test_exported_batchnorm_statistics_are_those_of_the_exported_weights(
    prepared: Path, tmp_path: Path
) -> None:
    """precise_bn: before validation and export the BatchNorm statistics are recomputed with the
    weights as they are; without it the file keeps the lagging running averages."""
    sampler = PatchSampler(
        open_split(load_manifest(prepared / "data"), "train"),
        PatchOptions(PATCH, 0.9, (0, 1, 2)),
        seed=0,
    )
    for precise, fresh in ((3, True), (0, False)):
        result = train(tiny_config(prepared / "data", tmp_path / str(precise), precise_bn=precise))
        assert result.last_weights is not None
        exported = load_weights(result.last_weights)
        model = exported.build()
        recalibrate_batchnorm(model, sampler_batches(sampler, 3, 2, "cpu"))
        same = [
            torch.allclose(v, exported.state[k], rtol=1e-5, atol=1e-6)
            for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var"))
        ]
        assert same and all(same) == fresh, (precise, same)


def test_resume_refuses_other_settings_and_a_fresh_start_refuses_a_used_folder(
    prepared: Path, psnr_run: Path
) -> None:
    data = prepared / "data"
    base = ["--stage", "psnr", "--epochs", "3", "--steps-per-epoch", "4", "--resume"]
    result = invoke(*train_args(data, psnr_run, *base, "--lr", "1e-3"))
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "cannot resume with different settings" in message
    assert "--lr was 0.003, now 0.001" in message
    assert "--critic-lr" not in message  # derived from --lr, and the PSNR stage has no critic
    result = invoke(*train_args(data, psnr_run, *base[:-1], "--lr", "3e-3", "--seed", "1"))
    assert result.exit_code == 1 and "already holds a training run" in result.output
    result = invoke(*train_args(data, prepared / "nothing-here", *base, "--lr", "3e-3"))
    assert result.exit_code == 1 and "no checkpoint to resume from" in result.output
    with pytest.raises(InputError, match="--patch was"):
        training.resume(
            tiny_config(data, psnr_run, epochs=3, lr=3e-3, patch=(16, 16, 16), critic_lr=1.5e-2)
        )


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(prepared / "data", tmp_path / "run", epochs=2, steps_per_epoch=2)
    real_save = torch.save
    calls: list[Path] = []

    def full_disk_after_the_first(obj: object, target: Path) -> None:
        calls.append(Path(target))
        if len(calls) == 1:
            real_save(obj, target)
            return
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_files.torch, "save", full_disk_after_the_first)
    with pytest.raises(OutputError, match=r"no space left on device.*previous checkpoint is kept"):
        train(config)
    assert len(calls) == 2 and not calls[1].exists()  # the half-written file is gone
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert not [p for p in (tmp_path / "run").iterdir() if ".part" in p.name]
    monkeypatch.undo()
    again = training.resume(config)  # the surviving checkpoint is a valid starting point
    assert again.status == "done" and again.step == 4


TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 60672 vs 60576"


def test_a_failed_checkpoint_write_says_why_in_words_and_whether_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save reports a full disk as its zip writer's RuntimeError; the message gives the
    free space instead, and says "kept" only where an earlier checkpoint exists."""
    path = tmp_path / "checkpoint.pt"
    payload = {"state": torch.zeros(1000)}  # 4000 bytes

    def full_disk(obj: object, target: Path) -> None:
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(run_files.torch, "save", full_disk)
    with pytest.raises(OutputError) as caught:
        run_files.write_checkpoint(path, payload)
    message = str(caught.value)
    assert "enforce fail" not in message and "disk full" in message
    assert "no checkpoint has been saved yet" in message and "kept" not in message
    assert not path.exists() and not list(tmp_path.iterdir())  # the partial file is gone

    monkeypatch.setattr(run_files.shutil, "disk_usage", lambda folder: SimpleNamespace(free=100))
    with pytest.raises(OutputError, match=r"no space left on device \(0\.0 MiB free"):
        run_files.write_checkpoint(path, payload)

    monkeypatch.undo()
    run_files.write_checkpoint(path, payload)
    monkeypatch.setattr(run_files.torch, "save", full_disk)
    with pytest.raises(OutputError, match="previous checkpoint is kept"):
        run_files.write_checkpoint(path, payload)
    assert torch.equal(read_checkpoint_raw(path)["state"], payload["state"])


def read_checkpoint_raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_run_folder_with_weights_but_no_checkpoint_is_not_overwritten(
    prepared: Path, tmp_path: Path
) -> None:
    """A full disk or a deleted checkpoint.pt leaves best/last.safetensors: a fresh start in
    that folder would overwrite them, and --resume has nothing to continue."""
    out = tmp_path / "run"
    out.mkdir()
    net = NetworkConfig("rrdg", TINY)
    degradation = load_manifest(prepared / "data").degradation
    save_weights(out / "last.safetensors", build_network(net).state_dict(), net, degradation)
    before = (out / "last.safetensors").read_bytes()
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "1"]
    result = invoke(*train_args(prepared / "data", out, *args))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "already holds trained weights (last.safetensors)" in lines[0]
    assert "another --out" in lines[0] and "checkpoint.pt" in lines[0]
    result = invoke(*train_args(prepared / "data", out, *args, "--resume"))
    assert result.exit_code == 1 and "only trained weights" in result.output
    assert (out / "last.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["last.safetensors"]


def test_resume_with_fewer_epochs_than_done_is_refused(prepared: Path, psnr_run: Path) -> None:
    """psnr_run is at step 8 (2 epochs of 4): --epochs 1 used to print "done: 8 of 4 steps"."""
    log_before = (psnr_run / LOG).read_text()
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "4", "--lr", "3e-3"]
    result = invoke(*train_args(prepared / "data", psnr_run, *args, "--resume"))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "already at step 8" in lines[0] and "--epochs 3" in lines[0]
    assert (psnr_run / LOG).read_text() == log_before  # the log was not cut back or extended


def ctrl_c_twice_in_validation(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """validate() that presses Ctrl-C twice: the first asks to stop, the second stops at once."""

    def pressed(*args: object, **kwargs: object) -> dict:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the signal handler runs at the next bytecode; never reached
        events.append("validated")
        return {}

    monkeypatch.setattr(training, "validate", pressed)


def test_sigterm_exits_143_like_the_other_commands(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM's SIGTERM stopped train with exit 130 (Ctrl-C's) where the other commands exit
    128 + the signal, as docs/cluster.md says: a job script testing for 143 misread it."""

    def terminated(*args: object, **kwargs: object) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    monkeypatch.setattr(training, "validate", terminated)
    out = tmp_path / "run"
    args = ["--stage", "psnr", "--epochs", "2", "--steps-per-epoch", "1"]
    result = invoke(*train_args(prepared / "data", out, *args))
    assert result.exit_code == 143, result.output
    assert "interrupted at step 1 of 2" in result.output and "--resume" in result.output
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 1


def test_a_second_ctrl_c_in_validation_says_what_was_saved(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    ctrl_c_twice_in_validation(monkeypatch, events)
    out = tmp_path / "run"
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "2", "--checkpoint-every", "1"]
    result = invoke(*train_args(prepared / "data", out, *args))
    assert result.exit_code == 130, result.output
    lines = result.output.strip().splitlines()
    assert "stopped at once at step 2 of 2" in lines[-1]
    assert f"{out / 'checkpoint.pt'} holds step 1" in lines[-1] and "--resume" in lines[-1]
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 1 and events == []

    seen: list[str] = []
    config = tiny_config(prepared / "data", tmp_path / "none", steps_per_epoch=2)
    with pytest.raises(training.StoppedAtOnce) as caught:
        train(config, on_event=lambda kind, payload: seen.append(kind))
    assert isinstance(caught.value, KeyboardInterrupt)  # still one for library callers
    assert caught.value.saved_step is None and caught.value.step == 2
    assert not (tmp_path / "none" / "checkpoint.pt").exists()
    assert seen[-1] == "validating"  # the progress bar says why it stands still


def test_a_second_ctrl_c_in_the_checkpoint_event_names_that_checkpoint(
    prepared: Path, tmp_path: Path
) -> None:
    """The message of a stop at once names the step checkpoint.pt holds, also when the second
    Ctrl-C lands in the "checkpoint" event of the checkpoint just written."""

    def on_event(kind: str, payload: dict) -> None:
        if kind == "checkpoint" and payload["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a stop request
            os.kill(os.getpid(), signal.SIGINT)  # and at once

    out = tmp_path / "run"
    config = tiny_config(prepared / "data", out, epochs=1, steps_per_epoch=4, checkpoint_every=2)
    with pytest.raises(training.StoppedAtOnce) as caught:
        train(config, on_event=on_event)
    assert caught.value.saved_step == read_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_a_first_ctrl_c_in_validation_stops_at_that_step(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the validation volumes are scored: the validation and its checkpoint are
    finished, and the call ends at that step instead of training one more."""
    real_validate = training.validate

    def pressed(*args: object, **kwargs: object) -> dict:
        os.kill(os.getpid(), signal.SIGINT)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(training, "validate", pressed)
    steps: list[int] = []

    def on_event(kind: str, payload: dict) -> None:
        if kind == "step":
            steps.append(payload["step"])

    out = tmp_path / "run"
    result = train(
        tiny_config(prepared / "data", out, epochs=2, steps_per_epoch=2), on_event=on_event
    )
    assert result.status == "interrupted" and result.step == 2 and steps == [1, 2]
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert [r["event"] for r in read_log(out / LOG)][-2:] == ["epoch", "interrupted"]


def test_a_stop_at_a_checkpoint_every_step_writes_one_checkpoint(
    prepared: Path, tmp_path: Path
) -> None:
    """Stopping at a --checkpoint-every step wrote the same checkpoint twice."""
    saved: list[int] = []

    def on_event(kind: str, payload: dict) -> None:
        if kind == "step" and payload["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # honoured at this step, after its checkpoint
        if kind == "checkpoint":
            saved.append(payload["step"])

    config = tiny_config(
        prepared / "data", tmp_path / "run", epochs=1, steps_per_epoch=4, checkpoint_every=2
    )
    result = train(config, on_event=on_event)
    assert result.status == "interrupted" and result.step == 2
    assert saved == [2]


class Stop(Exception):
    """Ends a run from its event callback once what a test looks for has happened."""


def stop_at_start(warnings: list[str]):
    def on_event(kind: str, payload: dict) -> None:
        if kind == "warning":
            warnings.append(payload["message"])
        if kind == "start":
            raise Stop

    return on_event


def test_a_gan_stage_continues_from_its_critic_file(
    prepared: Path, tmp_path: Path, psnr_run: Path
) -> None:
    """A GAN run leaves its critic next to last.safetensors; --init-critic starts the next run
    from it (one GPU session's GAN stage goes on in the next without a new critic that must
    catch up), with --critic-params taken from the file, as --net-params from --init."""
    data = prepared / "data"
    first = tmp_path / "gan1"
    args = ["--stage", "gan", "--epochs", "1", "--steps-per-epoch", "2"]
    args += ["--critic-steps", "1", "--critic-warmup", "0"]
    result = invoke(*train_args(data, first, *args, "--init", str(psnr_run / "best.safetensors")))
    assert result.exit_code == 0, result.output
    critic = load_weights(first / run_files.CRITIC_NAME, expect_network="patch_discriminator")
    assert critic.network.params == TINY_CRITIC
    assert critic.provenance["role"] == "critic" and critic.provenance["step"] == 2
    assert critic.degradation == load_manifest(data).degradation
    saved = read_checkpoint(first / run_files.CHECKPOINT_NAME)["state"]["critic"]
    assert all(torch.equal(saved[k], v) for k, v in critic.state.items())  # the last step's

    # the library: the critic starts as the file holds it
    config = tiny_config(
        data, tmp_path / "lib", stage="gan", critic_init=str(first / run_files.CRITIC_NAME)
    )
    trainer = training.Trainer(config, critic_init=critic)
    assert trainer.critic is not None
    assert all(torch.equal(trainer.critic.state_dict()[k], v) for k, v in critic.state.items())

    # the CLI, without --critic-params: the critic's settings come from its file; the run is
    # cut short by the time limit, then resumed with the same command after both starting files
    # moved (the checkpoint holds the networks, and run.json the critic's settings)
    second = tmp_path / "gan2"
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    more = ["--init", str(moved / "last.safetensors")]
    more += ["--init-critic", str(moved / run_files.CRITIC_NAME)]
    cli = train_args(data, second, *args, *more)
    at = cli.index("--critic-params")
    del cli[at : at + 2]
    result = invoke(*cli, "--time-limit", "1e-9")
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert "time limit reached: 1 of 2" in result.output
    other = tmp_path / "other_critic.safetensors"  # the same critic, other values
    torch.manual_seed(7)
    save_weights(
        other, build_network(critic.network).state_dict(), critic.network, critic.degradation
    )
    refused = [other if a == str(moved / run_files.CRITIC_NAME) else a for a in cli]
    result = invoke(*refused, "--resume")
    assert result.exit_code == 1 and "--init-critic" in result.output, result.output
    assert "is another file than the run was started from" in " ".join(result.output.split())
    shutil.rmtree(moved)
    result = invoke(*cli, "--resume")
    assert result.exit_code == 0 and "done: 2 of 2 steps" in result.output, result.output
    assert f"--init-critic {moved / run_files.CRITIC_NAME}: not found; ignored" in result.output
    provenance = load_weights(second / "last.safetensors").provenance
    assert provenance["critic_init"]["sha256"] == critic.sha256
    assert provenance["stage_steps"] == 4  # the first run's 2 GAN steps, then these 2
    # blending: the continued GAN model still names the PSNR model the first run was tuned from
    psnr = load_weights(psnr_run / "best.safetensors")
    assert provenance["psnr_origin"] == psnr.sha256
    files = load_generator_files(psnr_run / "best.safetensors", second / "last.safetensors")
    assert files.warnings() == []
    assert provenance["config"]["critic"]["params"] == TINY_CRITIC
    after = load_weights(second / run_files.CRITIC_NAME).state
    assert any(not torch.equal(after[k], v) for k, v in critic.state.items())  # it trained on

    # a generator and a critic from two different runs: told, not refused
    mixed = [*args, "--init", str(first / "last.safetensors")]
    mixed += ["--init-critic", str(second / run_files.CRITIC_NAME), "--time-limit", "1e-9"]
    result = invoke(*train_args(data, tmp_path / "gan3", *mixed))
    assert result.exit_code == 0, result.output
    assert "was saved at step 2 of another run than --init" in " ".join(result.output.split())


def test_bad_init_critic_is_one_line(prepared: Path, tmp_path: Path, psnr_run: Path) -> None:
    data, init = prepared / "data", str(psnr_run / "best.safetensors")
    degradation = load_manifest(data).degradation
    other = tmp_path / "wide.safetensors"
    wide = NetworkConfig("patch_discriminator", {**TINY_CRITIC, "base_features": 8})
    save_weights(other, build_network(wide).state_dict(), wide, degradation)
    gan = ["--stage", "gan", "--init", init, "--epochs", "1", "--steps-per-epoch", "1"]
    cases = [
        (["--stage", "psnr", "--init-critic", str(other)], "--init-critic is for --stage gan"),
        ([*gan, "--init-critic", init], "holds a 'rrdg' network, expected 'patch_discriminator'"),
        (
            [*gan, "--init-critic", str(other), "--critic-params", json.dumps(TINY_CRITIC)],
            "critic parameters",
        ),
        ([*gan, "--init-critic", str(tmp_path / "none.safetensors")], "no such weights file"),
        (  # a run's checkpoint instead of its critic: pointed to the critic's file
            [*gan, "--init-critic", str(psnr_run / "checkpoint.pt")],
            f"is a training checkpoint, not weights; give {psnr_run / 'critic.safetensors'}",
        ),
    ]
    for i, (extra, expected) in enumerate(cases):
        result = invoke(*train_args(data, tmp_path / f"run{i}", *extra))
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], result.output
        assert not (tmp_path / f"run{i}").exists()


@pytest.mark.parametrize("stage", ["psnr", "gan"])
def test_init_weights_of_the_gan_stage_are_warned_about(
    prepared: Path, tmp_path: Path, stage: str
) -> None:
    """The provenance records the stage: a GAN file as the start of either stage is told (it
    may be deliberate, so not refused); a PSNR file is the usual start and is not."""
    net = NetworkConfig("rrdg", TINY)
    degradation = load_manifest(prepared / "data").degradation
    for recorded in ("gan", "psnr"):
        init = tmp_path / f"{recorded}.safetensors"
        state = build_network(net).state_dict()
        save_weights(init, state, net, degradation, provenance={"stage": recorded})
        warnings: list[str] = []
        config = tiny_config(
            prepared / "data", tmp_path / f"run-{recorded}", stage=stage, init=str(init)
        )
        with pytest.raises(Stop):
            train(config, on_event=stop_at_start(warnings))
        if recorded == "gan":
            assert len(warnings) == 1 and "stage 'gan'" in warnings[0], warnings
            assert str(init) in warnings[0]
        else:
            assert warnings == []


def test_gan_resume_needs_no_init_file_but_refuses_another(
    prepared: Path, tmp_path: Path, psnr_run: Path
) -> None:
    """The documented resume, the same command plus --resume, once the --init file has moved:
    the checkpoint holds the weights, so the missing file is only warned about."""
    net = NetworkConfig("rrdg", TINY)
    degradation = load_manifest(prepared / "data").degradation
    init = tmp_path / "init_tmp.safetensors"
    save_weights(init, build_network(net).state_dict(), net, degradation)
    sha = load_weights(init).sha256
    out = tmp_path / "gan"
    args = ["--stage", "gan", "--init", str(init), "--epochs", "1", "--steps-per-epoch", "2"]
    args += ["--critic-steps", "1", "--critic-warmup", "0"]
    first = invoke(*train_args(prepared / "data", out, *args, "--time-limit", "1e-9"))
    assert first.exit_code == 0 and "time limit reached: 1 of 2" in first.output, first.output
    init.rename(tmp_path / "moved.safetensors")
    resumed = train_args(prepared / "data", out, *args, "--resume")
    at = resumed.index("--net-params")  # as users run it: the network came from --init
    del resumed[at : at + 2]
    result = invoke(*resumed)
    assert result.exit_code == 0, result.output
    assert "done: 2 of 2 steps" in result.output
    assert f"mrisr: warning: --init {init}: not found; ignored" in result.output
    provenance = load_weights(out / "last.safetensors").provenance
    assert provenance["init"] == {"path": str(init), "sha256": sha}

    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    save_weights(other, build_network(net).state_dict(), net, degradation)
    resumed[resumed.index(str(init))] = str(other)
    result = invoke(*resumed)
    assert result.exit_code == 1 and "is another file than the run was started from" in (
        " ".join(result.output.split())
    )
    # a PSNR run started without --init does not take one on resume either
    psnr = ["--stage", "psnr", "--epochs", "3", "--steps-per-epoch", "4", "--lr", "3e-3"]
    result = invoke(*train_args(prepared / "data", psnr_run, *psnr, "--init", other, "--resume"))
    assert result.exit_code == 1 and "the run was started without --init" in result.output


def test_a_gan_resume_with_another_lr_names_lr_alone(prepared: Path, tmp_path: Path) -> None:
    """The CLI derives --critic-lr from --lr (5 x): a GAN resume with another --lr is refused
    naming --lr only; a --critic-lr of its own that differs is named."""
    net = NetworkConfig("rrdg", TINY)
    init = tmp_path / "init.safetensors"
    degradation = load_manifest(prepared / "data").degradation
    save_weights(init, build_network(net).state_dict(), net, degradation)
    out = tmp_path / "gan"
    args = ["--stage", "gan", "--init", str(init), "--epochs", "1", "--steps-per-epoch", "2"]
    args += ["--critic-steps", "1", "--critic-warmup", "0"]
    first = invoke(
        *train_args(prepared / "data", out, *args, "--lr", "1e-5", "--time-limit", "1e-9")
    )
    assert first.exit_code == 0, first.output
    result = invoke(*train_args(prepared / "data", out, *args, "--lr", "2e-5", "--resume"))
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "--lr was 1e-05, now 2e-05" in message
    assert "--critic-lr" not in message
    own = ["--lr", "1e-5", "--critic-lr", "1e-4", "--resume"]
    result = invoke(*train_args(prepared / "data", out, *args, *own))
    message = " ".join(result.output.split())
    assert result.exit_code == 1 and "--critic-lr was 5e-05, now 0.0001" in message
    assert "--lr was" not in message


def test_data_given_as_its_manifest_and_a_checkpoint_given_as_weights(
    prepared: Path, tmp_path: Path, psnr_run: Path
) -> None:
    data = prepared / "data"
    result = invoke(*train_args(data / "manifest.json", tmp_path / "run", "--stage", "psnr"))
    assert result.exit_code == 1
    assert f"is the manifest; give --data the folder that holds it ({data})" in result.output
    args = train_args(data, tmp_path / "run", "--stage", "gan")
    args += ["--init", str(psnr_run / "checkpoint.pt")]
    at = args.index("--net-params")
    # without --net-params the CLI reads --init for the network, with them the library does
    for command in (args, args[:at] + args[at + 2 :]):
        result = invoke(*command)
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and "is a training checkpoint, not weights" in message
        assert str(psnr_run / "best.safetensors") in message
    assert not (tmp_path / "run").exists()


# --- bad input --------------------------------------------------------------------------------


def test_data_folder_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    result = invoke(*train_args(tmp_path / "data", tmp_path / "run", "--stage", "psnr"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no manifest.json" in lines[0] and "mrisr prepare" in lines[0]
    # a BIDS tree of raw scans given as --data: prepare it into another folder, not into itself
    (tmp_path / "data" / "sub-01" / "anat").mkdir(parents=True)
    write_nifti(
        tmp_path / "data" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", head_phantom((12, 10, 12))
    )
    result = invoke(*train_args(tmp_path / "data", tmp_path / "run", "--stage", "psnr"))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert f"mrisr prepare {tmp_path / 'data'} PREPARED_DIR" in " ".join(result.output.split())


def edited_copy(data: Path, copy: Path, edit) -> Path:
    """``data``'s manifest, changed by ``edit``, beside its subjects (linked, not copied)."""
    copy.mkdir()
    raw = json.loads((data / "manifest.json").read_text())
    edit(raw)
    (copy / "manifest.json").write_text(json.dumps(raw))
    (copy / "subjects").symlink_to(data / "subjects", target_is_directory=True)
    return copy


def test_a_hand_edited_manifest_is_refused_for_a_new_run_and_a_resume(
    prepared: Path, tmp_path: Path
) -> None:
    """The audit's two edits: --factor 2 -> 3 (weights that said 3 for data degraded by 2) and
    the val subject moved to test (a resumed run went on with another split); both ran."""
    data = prepared / "data"

    def factor_3(raw: dict) -> None:
        raw["degradation"]["factor"] = 3

    def no_val(raw: dict) -> None:
        for record in raw["subjects"]:
            record["split"] = "test" if record["split"] == "val" else record["split"]

    deg = edited_copy(data, tmp_path / "deg", factor_3)
    out = tmp_path / "new"
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "1"]
    result = invoke(*train_args(deg, out, *args))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"mrisr: error: {deg / 'manifest.json'} does not match its fingerprint (edited by "
        "hand?): prepare the dataset again with `mrisr prepare`"
    )
    assert not out.exists()  # refused before the run folder

    run = tmp_path / "run"
    assert train(tiny_config(data, run), on_event=interrupt_at(1)).status == "interrupted"
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", LOG)}
    split = edited_copy(data, tmp_path / "split", no_val)
    with pytest.raises(InputError, match="does not match its fingerprint"):
        training.resume(tiny_config(split, run))
    assert {name: (run / name).read_bytes() for name in before} == before


def test_out_inside_data_or_equal_to_it_is_refused_before_anything_is_written(
    prepared: Path, tmp_path: Path
) -> None:
    """`--out DATA/run1` put checkpoints and weights into the prepared dataset, where `mrisr
    prepare` reruns and dataset packs find them; also through a symlink to the data folder."""
    data = edited_copy(prepared / "data", tmp_path / "data", lambda raw: None)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "1"]
    cases = [
        (data / "run1", "is inside"),
        (data, "is the same folder as"),
        (tmp_path / "link" / "run1", "is inside"),
        (tmp_path / "link", "is the same folder as"),
    ]
    for out, where in cases:
        result = invoke(*train_args(data, out, *args))
        assert result.exit_code == 1, (out, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert f"--out {out} {where} --data {data}" in lines[0]
        assert f"such as --out {tmp_path / 'runs' / 'run1'}" in lines[0]
        assert sorted(p.name for p in data.iterdir()) == ["manifest.json", "subjects"]
    # a run an earlier version started there is warned about on --resume, not stopped
    warnings: list[str] = []

    def on_event(kind: str, payload: dict) -> None:
        if kind == "warning":
            warnings.append(payload["message"])

    with pytest.raises(InputError, match="checkpoint"):  # none there: the warning came first
        training.resume(tiny_config(data, data / "run1"), on_event=on_event)
    assert any("move the run to a folder beside the data" in w for w in warnings), warnings
    # beside the data, and the data inside the run folder, are fine
    assert train(tiny_config(data, tmp_path / "runs" / "run1", steps_per_epoch=1)).step == 1
    (tmp_path / "runs" / "run2").mkdir()
    inside = edited_copy(prepared / "data", tmp_path / "runs" / "run2" / "data", lambda raw: None)
    assert train(tiny_config(inside, tmp_path / "runs" / "run2", steps_per_epoch=1)).step == 1


def test_gan_stage_without_init(prepared: Path, tmp_path: Path) -> None:
    result = invoke(*train_args(prepared / "data", tmp_path / "run", "--stage", "gan"))
    assert result.exit_code == 1
    assert "--stage gan starts from the PSNR model: give --init" in result.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_init_of_another_network_or_other_data(prepared: Path, tmp_path: Path) -> None:
    degradation = load_manifest(prepared / "data").degradation
    fsrcnn = NetworkConfig("fsrcnn", {"d": 4, "s": 2, "m": 1})
    other = tmp_path / "fsrcnn.safetensors"
    save_weights(other, build_network(fsrcnn).state_dict(), fsrcnn, degradation)
    result = invoke(
        *train_args(prepared / "data", tmp_path / "run", "--stage", "gan", "--init", str(other))
    )
    assert result.exit_code == 1 and "holds a 'fsrcnn' network" in result.output
    rrdg = NetworkConfig("rrdg", TINY)
    cubic = tmp_path / "cubic.safetensors"
    save_weights(
        cubic, build_network(rrdg).state_dict(), rrdg, replace(degradation, interpolation="cubic")
    )
    with pytest.raises(WeightsError, match=r"prepared differently.*interpolation"):
        train(tiny_config(prepared / "data", tmp_path / "run2", stage="gan", init=str(cubic)))


def test_bad_training_options(prepared: Path, tmp_path: Path) -> None:
    data, run = prepared / "data", tmp_path / "run"
    result = invoke(*train_args(data, run, "--stage", "wgan"))  # a choice: a usage error
    assert result.exit_code == 2 and "--stage" in result.output
    # --lr 1e38 was an internal error inside Adam (an overflow); far less already diverges
    bad = (("--lr", "nan"), ("--lr", "1e38"), ("--critic-lr", "-1"), ("--lambda-gp", "inf"))
    for option, value in bad:
        result = invoke(*train_args(data, run, "--stage", "psnr", option, value))
        assert result.exit_code == 1 and f"{option} must be" in result.output, result.output
    result = invoke(*train_args(data, run, "--stage", "psnr", "--net", "unet"))
    assert result.exit_code == 1 and "--net must be one of" in result.output
    result = invoke(*train_args(data, run, "--stage", "psnr", "--net-params", "[1]"))
    assert result.exit_code == 1 and "--net-params takes a JSON object" in result.output
    result = invoke(*train_args(data, run, "--stage", "psnr", "--net-params", '{"width": 3}'))
    assert result.exit_code == 1 and "bad hyper-parameters for network 'rrdg'" in result.output
    negative = '{"features": -1}'  # torch's RuntimeError, not an internal error
    result = invoke(*train_args(data, run, "--stage", "psnr", "--net-params", negative))
    assert result.exit_code == 1 and "bad hyper-parameters for network 'rrdg'" in result.output
    assert not run.exists()  # nothing started


def test_val_patch_and_seed_are_checked_before_the_run_folder_is_made(
    prepared: Path, tmp_path: Path
) -> None:
    """--val-patch 4,4,4 failed at the first validation ("must exceed twice the margin 3", an
    internal error) and --seed -1 in numpy's generator, both after run.json and the log were
    written; now they are one line before anything is."""
    data, run = prepared / "data", tmp_path / "run"
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "1"]
    result = invoke(*train_args(data, run, *args, "--val-patch", "4,4,4"))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        "mrisr: error: --val-patch 4,4,4 leaves no core after cropping the margin of 3 voxels "
        "per face (at least 7 voxels per axis)"
    )
    assert not run.exists()
    for bad in ({"val_patch": (40, 6, 40)}, {"seed": -1}, {"seed": 2**64}, {"val_batch_size": 0}):
        with pytest.raises(InputError) as caught:
            tiny_config(data, run, **bad)
        assert "\n" not in str(caught.value)
    tiny_config(data, run, val_patch=(7, 7, 7), seed=2**64 - 1)  # the limits are allowed
    assert not run.exists()


def test_a_run_folder_that_cannot_be_made_is_one_line(prepared: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    result = invoke(*train_args(prepared / "data", out, "--stage", "psnr", "--epochs", "1"))
    assert result.exit_code == 1, result.output
    assert (
        result.stderr.strip()
        == f"mrisr: error: {out}: cannot write the run folder (Not a directory)"
    )


# --- several processes ------------------------------------------------------------------------


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        "-m",
        "mrisr_cli",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


_AGREE = """
import json, sys, torch.distributed as tdist
from pathlib import Path
from mrisr_cli.distributed import init_distributed
from mrisr_cli.training import _reduce_losses
info, device, _ = init_distributed("cpu")
# a Ctrl-C that reached rank 0 only, a time limit that rank 1 alone has passed
values = _reduce_losses({"l1": float(info.rank)}, info.rank == 0, info.rank == 1, info, device)
Path(sys.argv[1], f"rank{info.rank}.json").write_text(json.dumps(values, sort_keys=True))
tdist.destroy_process_group()
"""


@pytest.mark.slow
def test_ranks_agree_on_why_they_stop(tmp_path: Path) -> None:
    """The stop flag was agreed but "timed out" was each rank's own: with a signal on one rank
    only, one rank validated (its collectives) while the other stopped, and both hung."""
    script = tmp_path / "agree.py"
    script.write_text(_AGREE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    run = subprocess.run(
        [*command, "--standalone", str(script), str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    agreed = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert agreed == [{"_stop": 1.0, "_time_up": 1.0, "l1": 0.5}] * 2


_RANK0_WRITE_FAILS = """
import errno, os, sys
import torch
from mrisr_cli import training
from mrisr_cli.cli import main
from mrisr_cli.distributed import dist_from_env

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

def bug(*args, **kwargs):
    raise ValueError("boom")

def save_to_memory_only(obj, f, *args, **kwargs):  # torch pickles for collectives too
    if isinstance(f, (str, os.PathLike)):
        disk_full()
    return torch_save(obj, f, *args, **kwargs)

target, torch_save = sys.argv.pop(1), torch.save
if dist_from_env().rank == 0:  # rank 0 alone writes files
    if target == "weights":
        training.save_weights = disk_full
    elif target == "bug":
        training.save_weights = bug
    else:
        torch.save = save_to_memory_only  # write_checkpoint's
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["weights", "checkpoint", "bug"])
def test_a_write_failing_on_rank_0_stops_every_rank(
    prepared: Path, tmp_path: Path, target: str
) -> None:
    """Launched as a plain `srun` does (no torchrun to tear the others down): rank 1 met rank
    0's exit at its next collective call, as an internal error under gloo ("Connection closed
    by peer") and as a wait until the timeout where NCCL does not notice. Now both ranks stop
    with rank 0's one-line reason."""
    script = tmp_path / "rank0_write_fails.py"
    script.write_text(_RANK0_WRITE_FAILS)
    args = ["--net", "fsrcnn", "--net-params", json.dumps({"d": 8, "s": 4, "m": 1})]
    args += ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "2"]
    train = train_args(prepared / "data", tmp_path / "run", *args)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    for rank in (0, 1):
        # PYTHONPATH: the checkout's package, whatever an installed one would be
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO))
        env.update(MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        command = [sys.executable, str(script), target, *train]
        ranks.append(
            subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        )
    try:
        errors = [process.communicate(timeout=180)[1] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    if target == "bug":  # rank 0's own report of a bug; rank 1 says which process failed
        assert [process.returncode for process in ranks] == [3, 1], errors
        assert "internal error" in errors[0]
        assert errors[1].strip().endswith("mrisr: error: process 0 failed (ValueError: boom)")
        return
    assert [process.returncode for process in ranks] == [1, 1], errors
    for error in errors:
        lines = [line for line in error.splitlines() if line.startswith("mrisr: error:")]
        assert len(lines) == 1, error[-2000:]
        assert f"could not write the {target}" in lines[0]
        assert "no space left on device" in lines[0]


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_on_the_combined_batch(
    prepared: Path, tmp_path: Path
) -> None:
    """FSRCNN has no BatchNorm, so 2 x batch 2 under DDP is exactly 1 x batch 4 (up to
    floating-point summation order); RRDG's BatchNorm would need SyncBatchNorm (CUDA only)."""
    common = [
        "--stage",
        "psnr",
        "--net",
        "fsrcnn",
        "--net-params",
        json.dumps({"d": 8, "s": 4, "m": 1}),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--patch",
        "16,12,16",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--val-patch",
        ",".join(map(str, VAL_PATCH)),
        "--data",
        str(prepared / "data"),
    ]
    two = torchrun(2, ["train", *common, "--out", str(tmp_path / "two"), "--batch-size", "2"], REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    one = invoke("train", *common, "--out", tmp_path / "one", "--batch-size", "4")
    assert one.exit_code == 0, one.output
    logs = [read_log(tmp_path / name / LOG) for name in ("one", "two")]
    assert logs[0][0]["world_size"] == 1 and logs[1][0]["world_size"] == 2
    single, ddp = ([r["l1"] for r in log if r["event"] == "train"] for log in logs)
    print(f"DDP loss comparison: one process {single}, two processes {ddp}")
    np.testing.assert_allclose(ddp, single, rtol=1e-5)
    a = load_file(str(tmp_path / "one" / "last.safetensors"))
    b = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert not list((tmp_path / "two").glob("*.part*"))  # rank 1 wrote nothing stray

    # the GAN stage too: critic, gradient penalty and generator steps under DDP
    init = str(tmp_path / "one" / "last.safetensors")
    gan = [*common, "--init", init, "--critic-steps", "2", "--critic-warmup", "1"]
    gan += ["--critic-params", json.dumps(TINY_CRITIC), "--critic-lr", "1e-4"]
    gan[gan.index("psnr")] = "gan"
    gan[gan.index("--lr") + 1] = "1e-4"
    two = torchrun(2, ["train", *gan, "--out", str(tmp_path / "gan2"), "--batch-size", "2"], REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    one = invoke("train", *gan, "--out", tmp_path / "gan1", "--batch-size", "4")
    assert one.exit_code == 0, one.output
    single, ddp = (
        [r for r in read_log(tmp_path / name / LOG) if r["event"] == "train"]
        for name in ("gan1", "gan2")
    )
    for key in ("d_loss", "gp", "l1"):
        pair = [[r.get(key) for r in log] for log in (single, ddp)]
        print(f"DDP gan {key}: one process {pair[0]}, two processes {pair[1]}")
    # Not bit-equal: LeakyReLU makes the critic's input gradient piecewise constant, so the
    # rounding-level difference between the generator's output on 2 + 2 and on 4 patches can
    # flip a unit and move the penalty by ~1e-5, which Adam's first steps then spread.
    assert ddp[0]["d_loss"] == pytest.approx(single[0]["d_loss"], rel=1e-4)
    for a_record, b_record in zip(single, ddp, strict=True):
        for key in ("d_loss", "gp", "l1", "g_adv"):
            if key in a_record:
                assert b_record[key] == pytest.approx(a_record[key], rel=1e-2, abs=1e-3)


@pytest.mark.slow
def test_ctrl_c_in_the_cli_writes_a_checkpoint_and_exits_cleanly(
    prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["--stage", "psnr", "--epochs", "1", "--steps-per-epoch", "100000"]
    command = [sys.executable, "-m", "mrisr_cli", *train_args(prepared / "data", out, *args)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            log = out / LOG
            if log.exists() and any(r["event"] == "train" for r in read_log(log)):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    step = read_checkpoint(out / "checkpoint.pt")["step"]
    last = read_log(out / LOG)[-1]
    assert step >= 1 and last["event"] == "interrupted" and last["step"] == step
