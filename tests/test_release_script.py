"""`tools/train_release.py`, the script that trained the released weights, end to end on CPU.

Tiny networks, a synthetic four-subject dataset and second-long budgets: every stage runs (PSNR,
GAN, the three baselines with RRDG's step count, upsampling of the test split, evaluation, figure)
and leaves what the model card is built from; then a second call continues the PSNR-stage
networks from the first one's files, or trains them from scratch where there is none, up to
RRDG's total steps (training only: ``--skip-eval``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mrisr_cli.compact import pack_dataset
from mrisr_cli.weights import load_weights
from tests.test_prepare import prepared_heads

REPO = Path(__file__).resolve().parents[1]


def run_script(command: list[object]) -> None:
    """One call of the script, which must succeed (its output's end shows otherwise)."""
    run = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_release_script_runs_every_stage(tmp_path: Path) -> None:
    pack_dataset(prepared_heads(tmp_path, 4, (0.5, 0.25, 0.0, 0.25)), tmp_path / "pack")
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(REPO / "tools" / "train_release.py"),
        *("--pack", tmp_path / "pack", "--out", out, "--work", tmp_path / "work"),
        *("--device", "cpu", "--tiny", "--psnr-seconds", "2", "--gan-seconds", "5"),
        *("--eval-seconds", "30", "--deadline", "600", "--batch-size", "2"),
        *("--val-every", "2", "--workers", "1", "--jobs", "1"),
    ]
    run_script(command)
    results = json.loads((out / "results.json").read_text())
    assert "errors" not in results and "eval_error" not in results, results
    stages = results["training"]
    assert set(stages) == {"rrdg_psnr", "rrdg_gan", "fsrcnn", "srresnet", "mdcsrn"}
    steps = stages["rrdg_psnr"]["steps"]
    assert steps >= 1 and stages["rrdg_psnr"]["status"] == "time-limit"
    # RRDG's schedule, not its wall time: with --tiny the baselines are capped by the deadline
    # only (RRDG's 1.5x cap of a real run could cut them short on a loaded CPU), so each runs
    # RRDG's steps to the end
    for net in ("fsrcnn", "srresnet", "mdcsrn"):
        assert stages[net]["steps"] == steps and stages[net]["status"] == "done"
        for key in ("data", "batch_size", "lr"):
            assert stages[net]["config"][key] == stages["rrdg_psnr"]["config"][key], key
    methods = results["evaluation_images"]["methods"]
    assert set(methods) == {
        "lr",
        "bspline",
        "fsrcnn",
        "srresnet",
        "mdcsrn",
        "rrdg_psnr",
        "rrdg_gan",
        "rrdg_blend_0.5",
    }
    assert all(m["evaluated"] == 1 for m in methods.values())
    # the B-spline row is a real interpolation of the true LR volume: close to the linear one
    psnr = {name: m["metrics"]["psnr"]["mean"] for name, m in methods.items()}
    assert abs(psnr["bspline"] - psnr["lr"]) < 3.0 and psnr["lr"] > 20.0
    for name in ("rrdg_psnr", "rrdg_gan", "fsrcnn", "srresnet", "mdcsrn"):
        assert load_weights(out / f"{name}.safetensors").network.name == name.split("_")[0]
    assert load_weights(out / "rrdg_gan.safetensors").provenance["stage"] == "gan"
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "comparison.png" in names and "rrdg_psnr/log.jsonl" in names
    assert len(list(out.iterdir())) <= 7  # fits the 8 files a lent GPU sends back, with the log

    # a later GPU session continues every PSNR-stage network from the files the first one left,
    # and trains a network without one (the shipped weights/ holds RRDG's alone) from scratch up
    # to RRDG's total steps; only the PSNR stages matter here (GAN stage and evaluation skipped)
    previous, baselines = tmp_path / "previous", tmp_path / "baselines"  # as weights/ and
    for name, folder in (("rrdg_psnr", previous), ("fsrcnn", baselines)):  # tools/baseline_weights/
        folder.mkdir()
        (folder / f"{name}.safetensors").write_bytes((out / f"{name}.safetensors").read_bytes())
    again = tmp_path / "out2"
    command[command.index(out)] = again
    command[command.index("--work") + 1] = tmp_path / "work2"
    command[command.index("--gan-seconds") + 1] = "0"
    run_script([*command, "--continue-from", previous, baselines, "--skip-eval"])
    results = json.loads((again / "results.json").read_text())
    assert "errors" not in results and "eval_error" not in results, results
    assert set(results["training"]) == {"rrdg_psnr", "fsrcnn", "srresnet", "mdcsrn"}
    continued = results["continued_from"]
    rrdg_before = load_weights(out / "rrdg_psnr.safetensors").provenance["step"]
    assert continued["rrdg_psnr"]["steps_before"] == rrdg_before >= 1
    assert continued["fsrcnn"]["steps_before"] == steps  # the first call's baseline schedule
    rrdg = load_weights(again / "rrdg_psnr.safetensors")
    assert rrdg.provenance["init"]["sha256"] == continued["rrdg_psnr"]["sha256"]
    assert rrdg.provenance["stage_steps"] == rrdg_before + rrdg.provenance["step"]
    total = rrdg_before + results["training"]["rrdg_psnr"]["steps"]
    for name in ("srresnet", "mdcsrn"):  # no file: from scratch, RRDG's whole schedule
        assert continued[name] == {"path": None, "steps_before": 0}
        assert results["training"][name]["steps"] == total
        trained = load_weights(again / f"{name}.safetensors")
        assert trained.provenance["init"] is None and trained.provenance["stage_steps"] == total
    fsrcnn = load_weights(again / "fsrcnn.safetensors")
    if total > steps:  # it trains on to RRDG's total
        assert results["training"]["fsrcnn"]["steps"] == total - steps
        assert fsrcnn.provenance["init"]["sha256"] == continued["fsrcnn"]["sha256"]
        assert fsrcnn.provenance["stage_steps"] == total
    else:  # already there: the earlier file is kept as it is
        assert results["training"]["fsrcnn"] == {"status": "skipped (schedule done)"}
        assert fsrcnn.sha256 == continued["fsrcnn"]["sha256"]

    # scoring files from two folders (tools/device_score.sh: weights/ and tools/baseline_weights/)
    # trains nothing and takes each file from the first folder that has it
    scored = tmp_path / "out3"
    command[command.index(again)] = scored
    command[command.index("--work") + 1] = tmp_path / "work3"
    run_script([*command, "--trained", previous, baselines, "--skip-eval"])
    assert json.loads((scored / "results.json").read_text())["training"] == {}
    for name, folder in (("rrdg_psnr", previous), ("fsrcnn", baselines)):
        copied = (scored / f"{name}.safetensors").read_bytes()
        assert copied == (folder / f"{name}.safetensors").read_bytes(), name
    assert not (scored / "srresnet.safetensors").exists()  # in neither folder

    # a GAN-only session (tools/device_release.sh's header): --trained with --gan-seconds trains
    # the GAN stage alone, from the folder's PSNR file, and brings the new GAN file back
    gan_only = tmp_path / "out4"
    command[command.index(scored)] = gan_only
    command[command.index("--work") + 1] = tmp_path / "work4"
    command[command.index("--gan-seconds") + 1] = "2"
    run_script([*command, "--trained", previous, baselines, "--skip-eval", "--critic-steps", "3"])
    results = json.loads((gan_only / "results.json").read_text())
    assert "errors" not in results, results
    assert set(results["training"]) == {"rrdg_gan"}
    gan = load_weights(gan_only / "rrdg_gan.safetensors")
    psnr_sha = load_weights(previous / "rrdg_psnr.safetensors").sha256
    assert gan.provenance["stage"] == "gan" and gan.provenance["init"]["sha256"] == psnr_sha
    assert gan.provenance["config"]["critic_steps"] == 3

    # the next GAN-only session goes on from that GAN file and its critic, which comes back in
    # runs.tar.gz (--continue-gan): no new critic, the GAN steps add up, the blend's PSNR model
    # is still the first one
    with tarfile.open(gan_only / "runs.tar.gz") as tar:
        tar.extract("rrdg_gan/critic.safetensors", tmp_path / "back", filter="data")
    critic = load_weights(tmp_path / "back" / "rrdg_gan" / "critic.safetensors")
    assert critic.network.name == "patch_discriminator"
    later = tmp_path / "out5"
    command[command.index(gan_only)] = later
    command[command.index("--work") + 1] = tmp_path / "work5"
    continuing = ["--continue-gan", gan_only / "rrdg_gan.safetensors", critic.path]
    run_script([*command, "--trained", previous, baselines, "--skip-eval", *continuing])
    results = json.loads((later / "results.json").read_text())
    assert "errors" not in results and set(results["training"]) == {"rrdg_gan"}, results
    more = load_weights(later / "rrdg_gan.safetensors").provenance
    assert more["init"]["sha256"] == gan.sha256 and more["critic_init"]["sha256"] == critic.sha256
    assert more["psnr_origin"] == psnr_sha and more["config"]["critic_warmup"] == 0
    assert more["stage_steps"] == gan.provenance["stage_steps"] + more["step"]
