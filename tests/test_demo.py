"""`mrisr demo` (README's first command): its HR is bias-corrected as `mrisr prepare` corrects a
model's training data, and its SR is what `mrisr upsample --no-n4` makes of its LR."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_FAST
from typer.testing import CliRunner

from mrisr_cli.cli import app
from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.networks import build_network
from mrisr_cli.weights import save_weights

FAST = ["--device", "cpu", "--threads", "1"]


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [*map(str, args)])


_N4_RESULTS: dict[tuple[object, ...], np.ndarray] = {}


@pytest.fixture(autouse=True)
def n4_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's N4 (5 s with one thread) is computed once for the module: a later call of
    n4_correct, by `mrisr demo` or by a test, with the same voxels, spacing, settings and ITK
    thread count gets a copy of the first call's result. ANTs' N4 gives the same image, bit for
    bit, for the same input (checked: two runs, and one or two ITK threads), so every call returns
    what it would have computed; a call with other arguments (a demo that corrected something
    else) computes anew, and is compared with the real correction of the example."""
    import SimpleITK as sitk

    from mrisr_cli import demo, n4

    real: Callable[..., np.ndarray] = n4.n4_correct

    def n4_correct(data: np.ndarray, spacing: tuple[float, float, float], **kw: object):
        values = np.ascontiguousarray(data)
        key = (
            hashlib.sha256(values.tobytes()).hexdigest(),
            values.dtype.str,
            values.shape,
            tuple(float(s) for s in spacing),
            repr(sorted(kw.items())),
            sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        )
        if key not in _N4_RESULTS:
            _N4_RESULTS[key] = real(data, spacing, **kw)
        return _N4_RESULTS[key].copy()

    monkeypatch.setattr(n4, "n4_correct", n4_correct)
    monkeypatch.setattr(demo, "n4_correct", n4_correct)


@pytest.fixture
def n4_weights(tmp_path: Path) -> Path:
    """A tiny random network whose file says it was trained on N4-corrected data, as the
    shipped ones do."""
    torch.manual_seed(3)
    path = tmp_path / "n4.safetensors"
    save_weights(path, build_network(TINY_FAST).state_dict(), TINY_FAST, DegradationConfig())
    return path


def test_demo_sr_is_what_upsample_makes_of_its_lr(tmp_path: Path, n4_weights: Path) -> None:
    from mrisr_cli.demo import example_path
    from mrisr_cli.n4 import n4_correct

    demo = tmp_path / "demo"
    result = invoke("demo", demo, "--psnr-weights", n4_weights, *FAST)
    assert result.exit_code == 0, result.output
    assert "against the N4-corrected example" in " ".join(result.stdout.split())
    assert sorted(p.name for p in demo.iterdir()) == [
        "demo.png",
        "hr.nii.gz",
        "lr.nii.gz",
        "sr.json",
        "sr.nii.gz",
    ]
    again = tmp_path / "again.nii.gz"
    args = ["--psnr-weights", n4_weights, "--no-n4", *FAST]
    result = invoke("upsample", demo / "lr.nii.gz", again, *args)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(
        np.asarray(nib.load(demo / "sr.nii.gz").dataobj), np.asarray(nib.load(again).dataobj)
    )
    original = nib.load(example_path())
    corrected = n4_correct(np.asarray(original.dataobj, dtype=np.float32), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(np.asarray(nib.load(demo / "hr.nii.gz").dataobj), corrected)


def test_demo_into_a_file_is_one_error_line(tmp_path: Path, n4_weights: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    result = invoke("demo", blocker, "--psnr-weights", n4_weights, *FAST)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mrisr: error:") and "afile" in lines[0]


def test_demo_without_weights_leaves_no_sr_of_an_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MRISR_WEIGHTS", str(tmp_path / "none"))
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "sr.nii.gz").write_bytes(b"an unrelated file")
    result = invoke("demo", demo, *FAST)  # nothing is written to sr.nii.gz: not a clash
    assert result.exit_code == 0, result.output
    assert "the demo shows the degradation only" in result.output
    assert (demo / "sr.nii.gz").read_bytes() == b"an unrelated file"
    (demo / "sr.json").write_text("{}")
    result = invoke("demo", demo, "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in demo.iterdir()) == ["demo.png", "hr.nii.gz", "lr.nii.gz"]
