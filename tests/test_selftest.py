"""`mrisr selftest`: the installation check runs N4 and loads whatever trained weights are there."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mrisr_cli.cli import app
from mrisr_cli.errors import WeightsError
from mrisr_cli.pipeline import DEFAULT_GAN_NAME, DEFAULT_PSNR_NAME
from mrisr_cli.selftest import installed_weights_report

REPO = Path(__file__).resolve().parents[1]


def _sha256sums() -> dict[str, str]:
    lines = (REPO / "weights" / "SHA256SUMS").read_text().splitlines()
    return {name.lstrip("*"): digest for digest, name in (line.split() for line in lines if line)}


def test_reports_the_shipped_weights_with_their_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRISR_WEIGHTS", str(REPO / "weights"))
    if not (REPO / "weights" / DEFAULT_PSNR_NAME).is_file():
        pytest.skip("no shipped weights in this checkout")
    report = installed_weights_report("cpu")
    for name, digest in _sha256sums().items():
        assert f"{name} ({digest[:12]})" in report


def test_says_when_no_weights_are_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MRISR_WEIGHTS", str(tmp_path))
    assert installed_weights_report("cpu") == f"no trained weights installed in {tmp_path}"


def test_a_broken_installed_file_fails_the_selftest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / DEFAULT_PSNR_NAME).write_bytes(pickle.dumps({"not": "weights"}))
    monkeypatch.setenv("MRISR_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError):
        installed_weights_report("cpu")


@pytest.mark.slow
def test_cli_selftest_passes_and_names_what_it_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MRISR_WEIGHTS", str(tmp_path))
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["selftest", "--device", "cpu", "--threads", "1"])
    ran_with = torch.get_num_threads()
    torch.set_num_threads(threads)  # the rest of the suite keeps its threads
    assert result.exit_code == 0, result.output
    assert ran_with == 1  # a login node's self-test takes one CPU, not all
    text = " ".join(result.output.split())
    assert "selftest passed" in text and "through N4" in text
    assert "no trained weights installed" in text
    (tmp_path / DEFAULT_GAN_NAME).write_bytes(b"garbage")
    (tmp_path / DEFAULT_PSNR_NAME).write_bytes(b"garbage")
    broken = CliRunner().invoke(app, ["selftest", "--device", "cpu"])
    assert broken.exit_code == 1
    assert broken.output.count("mrisr: error:") == 1
