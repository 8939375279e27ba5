"""`mrisr degrade`'s outputs: names it refuses before writing anything, and no finished output
left behind when writing the other one fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import head_phantom, write_nifti
from typer.testing import CliRunner

from mrisr_cli.cli import app

SHAPE = (24, 20, 22)  # small: these tests are about files, not about the degradation


def degrade(folder: Path, *args: str) -> object:
    """`mrisr degrade` run in ``folder`` (the ``work`` fixture's), with names as a user types
    them there."""
    assert Path.cwd() == folder
    return CliRunner().invoke(app, ["degrade", *args])


def assert_one_line_error(result: object, needle: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)  # type: ignore[attr-defined]
    lines = result.stderr.rstrip("\n").splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    assert lines[0] == f"mrisr: error: {needle}", lines[0]
    assert "Traceback" not in result.stderr  # type: ignore[attr-defined]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` (hidden ones too), with the files' contents."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with ``in.nii.gz``, an empty folder ``dtest`` and an output folder ``o``; the
    tests run in it."""
    monkeypatch.chdir(tmp_path)
    write_nifti(tmp_path / "in.nii.gz", head_phantom(SHAPE))
    (tmp_path / "dtest").mkdir()
    (tmp_path / "o").mkdir()
    return tmp_path


SUFFIXES = ".nii.gz, .nii, .mgz or .mgh"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dtest"], "dtest: is a folder; give an image file name"),
        (["dtest", "--overwrite"], "dtest: is a folder; give an image file name"),
        (["o/lr_noext"], f"o/lr_noext: output file must end in {SUFFIXES}"),
        (["o/new/"], f"o/new: output file must end in {SUFFIXES}"),
        (
            ["o/lr2.nii.gz", "--keep-lowres", "o/low2.txt"],
            f"o/low2.txt: --keep-lowres file must end in {SUFFIXES}",
        ),
        (
            ["o/lr2.nii.gz", "--keep-lowres", "dtest", "--overwrite"],
            "dtest: --keep-lowres is a folder; give an image file name",
        ),
    ],
    ids=[
        "lr-folder",
        "lr-folder-overwrite",
        "lr-no-suffix",
        "lr-trailing-slash",
        "lowres-txt",
        "lowres-folder",
    ],
)
def test_degrade_refuses_output_names_it_cannot_write_before_writing(
    work: Path, args: list[str], message: str
) -> None:
    """A folder, or a name without an image suffix, was an internal error (nibabel could not tell
    the format of the temporary file) or the advice to use --overwrite; with --keep-lowres the
    degraded image was already written, so that a corrected rerun failed with "already exists"."""
    before = tree(work)
    result = degrade(work, "in.nii.gz", *args)
    assert_one_line_error(result, message)
    assert tree(work) == before  # nothing new, not even a hidden temporary file


def test_degrade_reruns_after_a_refused_lowres_name(work: Path) -> None:
    refused = degrade(work, "in.nii.gz", "o/lr2.nii.gz", "--keep-lowres", "o/low2.txt")
    assert refused.exit_code == 1
    result = degrade(work, "in.nii.gz", "o/lr2.nii.gz", "--keep-lowres", "o/low2.nii.gz")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (work / "o").iterdir()) == ["low2.nii.gz", "lr2.nii.gz"]


@pytest.mark.parametrize(
    ("lr", "low", "kind"),
    [
        ("lr.mgz", "low.mgh", nib.MGHImage),
        ("lr.NII.GZ", "low.nii", nib.Nifti1Image),
        ("lr.nii", "low.MGZ", nib.Nifti1Image),
    ],
    ids=["mgz-mgh", "upper-case-nii-gz", "nii-upper-case-mgz"],
)
def test_degrade_writes_every_image_suffix_whatever_its_case(
    work: Path, lr: str, low: str, kind: type
) -> None:
    """A name ending in ``.NII.GZ`` was an internal error: its temporary file ended in ``.GZ``."""
    result = degrade(work, "in.nii.gz", f"o/{lr}", "--keep-lowres", f"o/{low}")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (work / "o").iterdir()) == sorted([lr, low])
    assert isinstance(nib.load(work / "o" / lr), kind)
    assert nib.load(work / "o" / lr).shape == SHAPE
    assert nib.load(work / "o" / low).shape == (12, 20, 11)


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_failed_lowres_write_leaves_no_degraded_output(
    work: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    """The degraded image was renamed into place before the low-resolution one was written: a
    disk error on the second left the first as a finished output."""
    if overwrite:
        (work / "o" / "lr.nii.gz").write_bytes(b"old lr")
        (work / "o" / "low.nii.gz").write_bytes(b"old low")
    before = tree(work)
    real_save = nib.save

    def save(image: object, filename: str) -> None:
        if "low.nii.gz" in Path(filename).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(image, filename)

    monkeypatch.setattr(nib, "save", save)
    args = ["o/lr.nii.gz", "--keep-lowres", "o/low.nii.gz"] + (["--overwrite"] if overwrite else [])
    result = degrade(work, "in.nii.gz", *args)
    assert_one_line_error(result, "o/low.nii.gz: could not write (No space left on device)")
    assert tree(work) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_failed_rename_of_the_degraded_output_takes_back_the_lowres_one(
    work: Path, monkeypatch: pytest.MonkeyPatch, overwrite: list[str]
) -> None:
    """Both files are renamed only once both are written, the low-resolution one first: should
    the last rename fail, the low-resolution file, new, is removed again (with --overwrite too,
    where there was nothing to replace)."""
    before = tree(work)
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "lr.nii.gz":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = degrade(work, "in.nii.gz", "o/lr.nii.gz", "--keep-lowres", "o/low.nii.gz", *overwrite)
    assert_one_line_error(result, "o/lr.nii.gz: could not write (Input/output error)")
    assert tree(work) == before


def test_degrade_writes_both_outputs_with_the_permissions_of_a_new_file(work: Path) -> None:
    result = degrade(work, "in.nii.gz", "o/lr.nii.gz", "--keep-lowres", "o/low.nii.gz")
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    for name in ("lr.nii.gz", "low.nii.gz"):
        assert (work / "o" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    np.testing.assert_allclose(nib.load(work / "o" / "lr.nii.gz").affine, np.eye(4))


def test_window_option_sets_the_k_space_windows(work: Path) -> None:
    """--window U,F,P (SPEC: the window is an option, recorded with the model): the output is
    degrade_volume's with those windows, and the authors' are the default."""
    from mrisr_cli.cli_options import WINDOW_DEFAULT, parse_window
    from mrisr_cli.degradation import DegradationConfig, degrade_volume

    assert DegradationConfig(**parse_window(WINDOW_DEFAULT)) == DegradationConfig()
    hr = np.asarray(nib.load("in.nii.gz").dataobj, dtype=np.float32)
    for name, window in (("a.nii.gz", WINDOW_DEFAULT), ("b.nii.gz", "1.5,1,0.5")):
        assert degrade(work, "in.nii.gz", name, "--window", window).exit_code == 0
        config = DegradationConfig(**parse_window(window))
        expected = degrade_volume(hr, config, affine=nib.load("in.nii.gz").affine)
        np.testing.assert_allclose(nib.load(name).get_fdata(), expected, rtol=1e-5, atol=1e-4)
    assert not np.allclose(nib.load("a.nii.gz").get_fdata(), nib.load("b.nii.gz").get_fdata())


@pytest.mark.parametrize(
    ("window", "needle"),
    [
        ("1.25,1.5", "three positive numbers"),
        ("1.25,x,1/3", "three positive numbers"),
        ("1.25,1.5,1/0", "three positive numbers"),
        ("1.25,nan,0.3", "three positive numbers"),
        ("1.25,1.5,-1", "three positive numbers"),
        ("0.9,1.5,1/3", "U must be more than 1"),
        ("1,1.5,1/3", "U must be more than 1"),
        ("1.01,1.5,1/3", "vanishes at the edge of a 20-sample axis"),
    ],
)
def test_bad_window_values_are_one_line_and_write_nothing(
    work: Path, window: str, needle: str
) -> None:
    before = tree(work)
    result = degrade(work, "in.nii.gz", "o/lr.nii.gz", "--window", window)
    assert result.exit_code == 1 and needle in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert tree(work) == before


def test_an_image_too_small_to_degrade_is_named(work: Path) -> None:
    write_nifti(work / "thin.nii.gz", head_phantom((3, 20, 22)))
    before = tree(work)
    result = degrade(work, "thin.nii.gz", "o/lr.nii.gz")
    assert_one_line_error(
        result, "thin.nii.gz: volume of shape (3, 20, 22) is too small to degrade by 2"
    )
    assert tree(work) == before
