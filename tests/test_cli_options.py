"""Options shared by several commands (--axes, --factor, --patch): every bad value is one line,
before any work, and no file is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import head_phantom, write_nifti
from typer.testing import CliRunner

from mrisr_cli.cli import app
from mrisr_cli.cli_options import parse_axes, parse_triple
from mrisr_cli.errors import InputError

runner = CliRunner()


@pytest.mark.parametrize(("text", "axes"), [("0,2", (0, 2)), ("2, 0", (0, 2)), ("1", (1,))])
def test_axes_are_parsed_sorted(text: str, axes: tuple[int, ...]) -> None:
    assert parse_axes(text) == axes


@pytest.mark.parametrize("text", ["", " , ", "5", "-1", "a", "0.5", "0,0", "2,0,2"])
def test_bad_axes_are_refused(text: str) -> None:
    """No axis would degrade nothing; a repeated one is a typo (for 0,2?), not a wish."""
    with pytest.raises(InputError, match="--axes"):
        parse_axes(text)


@pytest.mark.parametrize("text", ["64,40", "64,40,0", "64,40,x", "a,b,c", "", "64,40,64,1"])
def test_bad_patch_is_refused(text: str) -> None:
    with pytest.raises(InputError, match="--patch takes three positive integers"):
        parse_triple(text, "--patch")
    assert parse_triple("64x40x64", "--patch") == (64, 40, 64)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--axes", ""], 1, "--axes takes axis numbers"),
        (["--axes", "0,0"], 1, "--axes names an axis twice"),
        (["--axes", "3"], 1, "--axes takes axis numbers"),
        (["--factor", "1"], 2, "--factor"),
        (["--factor", "0"], 2, "--factor"),
    ],
)
def test_degrade_refuses_settings_that_degrade_nothing(
    tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    """`--axes ""` and `--factor 1` used to write an undegraded copy and exit 0. (A range error
    is click's usage error, exit 2, which the console script prints as one line: tested in
    test_cli_upsample.py; CliRunner shows click's own box.)"""
    hr = write_nifti(tmp_path / "hr.nii.gz", head_phantom((24, 20, 24)))
    result = runner.invoke(app, ["degrade", str(hr), str(tmp_path / "lr.nii.gz"), *args])
    assert result.exit_code == code, result.stderr
    assert needle in result.stderr
    if code == 1:
        lines = result.stderr.rstrip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("mrisr: error:"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hr.nii.gz"]


@pytest.mark.parametrize(
    ("args", "needle"), [(["--axes", ""], "--axes takes"), (["--factor", "1"], "--factor")]
)
def test_prepare_refuses_settings_that_degrade_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_nifti(src / "a.nii.gz", head_phantom((24, 20, 24)))
    result = runner.invoke(app, ["prepare", str(src), str(tmp_path / "out"), *args])
    assert result.exit_code in (1, 2) and needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_a_negative_seed_is_a_usage_error_before_any_work(tmp_path: Path, command: str) -> None:
    """numpy refuses a negative seed: prepare failed with an internal error after preparing
    every subject (and wrote no manifest), train after making its run folder."""
    src = tmp_path / "src"
    src.mkdir()
    write_nifti(src / "a.nii.gz", head_phantom((24, 20, 24)))
    out = tmp_path / "out"
    train = ["--stage", "psnr", "--data", str(src), "--out", str(out)]
    args = [str(src), str(out)] if command == "prepare" else train
    result = runner.invoke(app, [command, *args, "--seed", "-1"])
    assert result.exit_code == 2 and "--seed" in result.stderr, result.stderr
    assert not out.exists()
