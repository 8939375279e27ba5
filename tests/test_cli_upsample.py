"""`mrisr upsample` end to end through the real CLI, and every kind of bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    NO_N4,
    TINY_FAST,
    head_phantom,
    n4_stop_script,
    real_volume,
    sigterm_once_started,
    write_nifti,
)
from typer.testing import CliRunner

from mrisr_cli.cli import app
from mrisr_cli.inference import InferenceOptions, super_resolve
from mrisr_cli.intensity import foreground_mask, foreground_stats
from mrisr_cli.networks import build_network
from mrisr_cli.volumes import canonical_reorientation
from mrisr_cli.weights import load_weights, save_weights, sha256_of

runner = CliRunner()
SMALL_PATCH = ["--patch", "24,16,24"]


def upsample(*args: str | Path) -> object:
    return runner.invoke(app, ["upsample", *map(str, args)])


def assert_one_line_error(result: object, needle: str) -> None:
    assert result.exit_code != 0  # type: ignore[attr-defined]
    lines = result.stderr.rstrip("\n").splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # exactly one line, no blank one after it
    assert lines[0].startswith("mrisr: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr  # type: ignore[attr-defined]


def no_partial_files(folder: Path) -> bool:
    return not any(".part" in p.name for p in folder.iterdir())


def test_upsample_keeps_shape_affine_orientation_and_writes_sidecar(
    tmp_path: Path, fast_weights: Path
) -> None:
    affine = np.array([[0, 0, -1.0, 30], [-1.0, 0, 0, 20], [0, 1.0, 0, -10], [0, 0, 0, 1]])
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom((36, 44, 40)), affine, np.uint8)
    out = tmp_path / "out.nii.gz"
    tiling = ["--margin", "2", "--overlap", "4"]
    result = upsample(
        src, out, "--psnr-weights", fast_weights, *SMALL_PATCH, *tiling, "--device", "cpu"
    )
    assert result.exit_code == 0, result.stderr
    image = nib.load(out)
    assert image.shape == (36, 44, 40)
    np.testing.assert_allclose(image.affine, affine)
    assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(affine)
    assert image.get_data_dtype() == np.float32
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["weights"][0]["sha256"] == load_weights(fast_weights).sha256
    assert sidecar["alpha"] == 1.0 and sidecar["precision"] == "fp32"
    assert sidecar["device"] == "cpu" and sidecar["mrisr_version"]
    assert sidecar["patch"] == [24, 16, 24] and sidecar["margin"] == 2
    assert sidecar["overlap"] == 4 and sidecar["half"] is False
    assert sidecar["input"] == str(src.absolute()) and sidecar["output"] == str(out.absolute())
    assert sidecar["threads"] == torch.get_num_threads() >= 1
    assert no_partial_files(tmp_path)


def test_sidecar_paths_do_not_depend_on_the_working_folder(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths given relative to the working folder are recorded absolute: the sidecar is read
    later, from elsewhere."""
    monkeypatch.chdir(tmp_path)
    result = upsample(phantom_file.name, "o.nii.gz", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["input"] == str(tmp_path / phantom_file.name)
    assert sidecar["output"] == str(tmp_path / "o.nii.gz")


def test_output_equals_network_on_normalised_canonical_input(
    tmp_path: Path, fast_weights: Path
) -> None:
    """The CLI's output is the stitched network output mapped back to the input's units (the
    flat background, kept by default, is tested below)."""
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    data = head_phantom((40, 36, 44))
    src = write_nifti(tmp_path / "in.nii.gz", data, affine)
    out = tmp_path / "out.nii.gz"
    raw = ["--psnr-weights", fast_weights, "--no-keep-background", *SMALL_PATCH]
    assert upsample(src, out, *raw).exit_code == 0
    reo = canonical_reorientation(affine, data.shape)
    canonical = reo.apply(data)
    stats = foreground_stats(canonical, foreground_mask(canonical))
    model = load_weights(fast_weights).build()
    expected = stats.denormalise(
        super_resolve(
            stats.normalise(canonical),
            model,
            InferenceOptions(patch=(24, 16, 24), skip_background=False),
        )
    )
    expected = reo.undo(np.maximum(expected, 0))
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj), expected, atol=1e-4)


def test_alpha_end_points_and_several_alphas_in_one_call(
    tmp_path: Path, psnr_weights: Path, gan_weights: Path
) -> None:
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom((30, 20, 30)))
    base = ["--psnr-weights", psnr_weights, "--gan-weights", gan_weights, *SMALL_PATCH]
    result = upsample(src, tmp_path / "sr.nii.gz", "--alpha", "0,0.5,1", *base)
    assert result.exit_code == 0, result.stderr
    outs = {
        a: np.asarray(nib.load(tmp_path / f"sr_alpha-{a}.nii.gz").dataobj)
        for a in ("0", "0.5", "1")
    }
    only_psnr = tmp_path / "psnr_only.nii.gz"
    assert upsample(src, only_psnr, "--psnr-weights", psnr_weights, *SMALL_PATCH).exit_code == 0
    only_gan = tmp_path / "gan_only.nii.gz"
    result = upsample(src, only_gan, "--gan-weights", gan_weights, "--alpha", "0", *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(outs["1"], np.asarray(nib.load(only_psnr).dataobj))
    np.testing.assert_array_equal(outs["0"], np.asarray(nib.load(only_gan).dataobj))
    assert not np.array_equal(outs["0.5"], outs["1"])


def test_several_alphas_read_an_input_and_fit_n4_once(
    tmp_path: Path, psnr_weights: Path, gan_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N4 on a whole head takes minutes: three alphas share one read and one fit, and give what
    three separate runs give."""
    from mrisr_cli import pipeline

    calls = {"load": 0, "n4": 0}

    def counted(name: str, function):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(pipeline, "load_volume", counted("load", pipeline.load_volume))
    monkeypatch.setattr(pipeline, "n4_fit", counted("n4", pipeline.n4_fit))
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom((30, 20, 30)))
    base = ["--psnr-weights", psnr_weights, "--gan-weights", gan_weights, *SMALL_PATCH, "--n4"]
    result = upsample(src, tmp_path / "sr.nii.gz", "--alpha", "0,0.5,1", *base)
    assert result.exit_code == 0, result.stderr
    assert calls == {"load": 1, "n4": 1}
    for alpha in ("0", "0.5"):
        alone = tmp_path / f"alone-{alpha}.nii.gz"
        assert upsample(src, alone, "--alpha", alpha, *base).exit_code == 0
        np.testing.assert_array_equal(
            np.asarray(nib.load(alone).dataobj),
            np.asarray(nib.load(tmp_path / f"sr_alpha-{alpha}.nii.gz").dataobj),
        )


def test_blending_files_whose_provenance_disagrees_warns(tmp_path: Path) -> None:
    """Roles swapped, or a GAN model fine-tuned from another PSNR model: the run goes on (the
    user may mean it) with a warning, also in the sidecar. The shipped pair gives none."""
    from mrisr_cli.pipeline import load_generator_files

    def weights(name: str, seed: int, **provenance: object) -> Path:
        torch.manual_seed(seed)
        model = build_network(TINY_FAST)
        path = tmp_path / name
        save_weights(path, model.state_dict(), TINY_FAST, NO_N4, provenance=provenance)
        return path

    psnr = weights("psnr.safetensors", 1, stage="psnr", init=None)
    gan = weights("gan.safetensors", 2, stage="gan", init={"sha256": load_weights(psnr).sha256})
    other = weights("other.safetensors", 3, stage="gan", init={"sha256": "ab" * 32})
    assert load_generator_files(psnr, gan).warnings() == []
    assert load_generator_files(None, None).warnings() == []  # the shipped pair
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom((30, 20, 30)))
    swapped = upsample(
        src, tmp_path / "o.nii.gz", "--psnr-weights", gan, "--gan-weights", psnr, *SMALL_PATCH
    )
    assert swapped.exit_code == 0, swapped.stderr
    assert f"{gan}: trained as the GAN model, given as --psnr-weights" in swapped.stderr
    assert f"{psnr}: trained as the PSNR model, given as --gan-weights" in swapped.stderr
    recorded = json.loads((tmp_path / "o.json").read_text())["warnings"]
    assert any("given as --psnr-weights" in w for w in recorded)
    unrelated = upsample(
        src, tmp_path / "u.nii.gz", "--psnr-weights", psnr, "--gan-weights", other, *SMALL_PATCH
    )
    assert unrelated.exit_code == 0, unrelated.stderr
    assert "fine-tuned from another model (sha256 abababababab)" in unrelated.stderr


def test_folder_of_inputs_to_output_folder(tmp_path: Path, fast_weights: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        write_nifti(src / f"sub-0{i}_T1w.nii.gz", head_phantom((30, 20, 30), seed=i))
    (src / "notes.txt").write_text("not an image")
    result = upsample(src, tmp_path / "out", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["sub-00_T1w.json", "sub-00_T1w.nii.gz", "sub-01_T1w.json", "sub-01_T1w.nii.gz"]


def test_hidden_files_in_an_input_folder_are_not_inputs(tmp_path: Path, fast_weights: Path) -> None:
    """macOS ``._`` files and the ``.name.part`` file of an interrupted write are not scans."""
    src = tmp_path / "in"
    src.mkdir()
    write_nifti(src / "sub-01_T1w.nii.gz", head_phantom((30, 20, 30)))
    (src / "._sub-01_T1w.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (src / ".sub-01_T1w.nii.gz.k3.part.nii.gz").write_bytes(b"half")
    result = upsample(src, tmp_path / "out", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "sub-01_T1w.json",
        "sub-01_T1w.nii.gz",
    ]


def test_an_existing_sidecar_is_not_replaced(tmp_path: Path, fast_weights: Path) -> None:
    """BIDS keeps an image's metadata in a .json beside it: writing sub-01_T1w.nii.gz next to
    sub-01_T1w.nii must not silently replace sub-01_T1w.json."""
    src = write_nifti(tmp_path / "sub-01_T1w.nii", head_phantom((30, 20, 30)))
    bids = tmp_path / "sub-01_T1w.json"
    bids.write_text('{"RepetitionTime": 2.3}')
    out = tmp_path / "sub-01_T1w.nii.gz"
    result = upsample(src, out, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert_one_line_error(result, "sub-01_T1w.json: already exists")
    assert bids.read_text() == '{"RepetitionTime": 2.3}' and not out.exists()
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "sub-01_T1w.json").write_text("{}")
    assert_one_line_error(upsample(src, folder, "--psnr-weights", fast_weights), "already exists")
    assert sorted(p.name for p in folder.iterdir()) == ["sub-01_T1w.json"]


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    """`upsample scan.nii.gz scan.nii.gz --overwrite` would destroy the scan; so would a folder
    run whose output folder is the input folder."""
    before = phantom_file.read_bytes()
    base = ["--psnr-weights", fast_weights, "--overwrite", *SMALL_PATCH]
    assert_one_line_error(upsample(phantom_file, phantom_file, *base), "would overwrite an input")
    same_folder = upsample(tmp_path, f"{tmp_path}/", *base)
    assert_one_line_error(same_folder, "is an input folder")
    second = write_nifti(tmp_path / "second.nii", head_phantom((30, 20, 30)))
    files_folder = upsample(phantom_file, second, f"{tmp_path}/", *base)  # written beside them
    assert_one_line_error(files_folder, "is an input folder")
    assert phantom_file.read_bytes() == before and no_partial_files(tmp_path)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("empty_folder", "folder holds no .nii/.nii.gz/.mgz images"),
        ("folder_into_file", "several inputs need an output folder, this is a file"),
        ("missing_input", "no such file or folder"),
        ("no_core", "--patch 24,16,24 leaves no core after cropping --margin 8 per face"),
        ("overlap", "--overlap 10 must be below the patch core (10 voxels)"),
        ("bad_patch", "--patch takes three positive integers like 64,40,64, got '24,16'"),
        ("not_nifti_name", "output file must end in .nii.gz, .nii, .mgz, .mgh"),
        ("several_into_image_name", "several inputs need an output folder, and this names an"),
        ("folder_into_image_name", "several inputs need an output folder, and this names an"),
        ("alphas_named_alike", "would both write"),
        ("label_map", "distinct values: a label map or mask, not a T1 image"),
    ],
)
def test_impossible_plans_are_one_line_before_any_work(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, case: str, needle: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken.nii.gz").write_bytes(b"not an output folder")
    paths: list[str | Path] = {
        "empty_folder": [tmp_path / "empty", tmp_path / "out"],
        "folder_into_file": [phantom_file, tmp_path / "b.nii.gz", tmp_path / "taken.nii.gz"],
        "missing_input": [tmp_path / "absent.nii.gz", tmp_path / "o.nii.gz"],
        "not_nifti_name": [phantom_file, tmp_path / "o.png"],
        # a typo'd folder name, or a file name where several outputs need a folder: it used to
        # become a folder called o.nii.gz
        "several_into_image_name": [phantom_file, tmp_path / "b.nii.gz", tmp_path / "o.nii.gz"],
        "folder_into_image_name": [tmp_path / "in", tmp_path / "o.nii.gz"],
        "label_map": [tmp_path / "labels.nii.gz", tmp_path / "o.nii.gz"],
    }.get(case, [phantom_file, tmp_path / "o.nii.gz"])
    options = {
        "no_core": [*SMALL_PATCH, "--margin", "8"],  # 16 - 2 x 8 = 0
        "overlap": [*SMALL_PATCH, "--overlap", "10"],  # the core is 16 - 2 x 3 = 10
        "bad_patch": ["--patch", "24,16"],
        # both named o_alpha-0.123457: the second used to fail after the first had run
        "alphas_named_alike": [*SMALL_PATCH, "--alpha", "0.123456789,0.1234567891"],
    }.get(case, SMALL_PATCH)
    if case in ("several_into_image_name", "folder_into_file"):
        write_nifti(tmp_path / "b.nii.gz", head_phantom((30, 20, 30)))
    if case == "folder_into_image_name":
        (tmp_path / "in").mkdir()
        write_nifti(tmp_path / "in" / "a.nii.gz", head_phantom((30, 20, 30)))
    if case == "label_map":  # a segmentation with labels 0-3
        labels = np.digitize(head_phantom(), [0.5, 40.0, 90.0]).astype(np.int16)
        write_nifti(tmp_path / "labels.nii.gz", labels)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(upsample(*paths, "--psnr-weights", fast_weights, *options), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written or made


def test_a_run_that_wrote_nothing_leaves_no_new_output_folder(
    tmp_path: Path, fast_weights: Path
) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    (tmp_path / "b.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    result = upsample(
        tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", out, "--psnr-weights", fast_weights
    )
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert not out.exists()
    out.mkdir()  # a folder that was there before stays
    result = upsample(
        tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", out, "--psnr-weights", fast_weights
    )
    assert result.exit_code == 1 and out.is_dir()


def test_a_bad_input_in_a_folder_is_reported_and_the_others_go_on(
    tmp_path: Path, fast_weights: Path
) -> None:
    """One corrupt scan among good ones: an error line naming it, the good ones written, exit 1
    (README: a bad input is reported and the others go on)."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_nifti(folder / "a.nii.gz", head_phantom((30, 20, 30)))
    (folder / "b.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    write_nifti(folder / "c.nii.gz", head_phantom((30, 20, 30), seed=1))
    out = tmp_path / "out"
    result = upsample(folder, out, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("mrisr: error:")]
    assert len(errors) == 1 and str(folder / "b.nii.gz") in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz", "c.json", "c.nii.gz"]


def test_skip_existing_resumes_a_batch_and_refuses_what_another_run_made(
    tmp_path: Path, psnr_weights: Path, gan_weights: Path
) -> None:
    """A rerun with --skip-existing skips outputs whose sidecar records the same input, alpha
    and weights, runs the missing ones, and refuses any other existing output."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, seed in (("a", 0), ("b", 1)):
        write_nifti(folder / f"{name}.nii.gz", head_phantom((30, 20, 30), seed=seed))
    out = tmp_path / "out"
    weights = ["--psnr-weights", psnr_weights, "--gan-weights", gan_weights, *SMALL_PATCH]
    first = upsample(folder, out, *weights, "--alpha", "0,1")
    assert first.exit_code == 0, first.stderr
    # "wrote X (1.0 s, cpu, 2 threads)", "1 thread" on a one-CPU machine
    assert re.search(r"\(\d+\.\d s, cpu, \d+ threads?\)", first.stderr), first.stderr
    assert "[4/4] " in first.stderr  # not a terminal: each job's start has a line
    (out / "b_alpha-1.nii.gz").unlink()  # stopped before its last output
    (out / "b_alpha-1.json").unlink()
    (out / "a_alpha-0.nii.gz").unlink()  # deleted to be redone: its sidecar is left over
    kept = (out / "a_alpha-1.nii.gz").stat().st_mtime_ns

    again = upsample(folder, out, *weights, "--alpha", "0,1", "--skip-existing")
    assert again.exit_code == 0, again.stderr
    skipped = [line for line in again.stderr.splitlines() if line.startswith("mrisr: skipped:")]
    assert len(skipped) == 2 and "finished by an earlier run" in skipped[0], again.stderr
    assert (out / "a_alpha-1.nii.gz").stat().st_mtime_ns == kept
    assert len(list(out.glob("*.nii.gz"))) == len(list(out.glob("*.json"))) == 4
    assert (
        "wrote" not in upsample(folder, out, *weights, "--alpha", "0,1", "--skip-existing").stderr
    )

    other_weights = upsample(
        folder, out, "--psnr-weights", gan_weights, "--gan-weights", psnr_weights,
        *SMALL_PATCH, "--alpha", "0,1", "--skip-existing",
    )  # fmt: skip
    assert other_weights.exit_code == 1 and "Traceback" not in other_weights.stderr
    errors = error_lines(other_weights)
    assert len(errors) == 4 and all("made by another run (other weights)" in e for e in errors)
    other_input = upsample(
        folder / "b.nii.gz", out / "a_alpha-1.nii.gz", *weights, "--skip-existing"
    )
    assert_one_line_error(other_input, f"made by another run (input {folder / 'a.nii.gz'}")
    other_settings = upsample(
        folder / "a.nii.gz",
        out / "a_alpha-1.nii.gz",
        *weights,
        "--skip-existing",
        "--no-keep-background",
    )
    assert_one_line_error(
        other_settings, "made by another run (keep_background True, air_tiles 'input')"
    )
    (out / "a_alpha-0.json").unlink()
    no_record = upsample(folder, out, *weights, "--alpha", "0,1", "--skip-existing")
    assert no_record.exit_code == 1  # the one output it cannot take over; the others are done
    assert error_lines(no_record) == [
        f"mrisr: error: {out / 'a_alpha-0.nii.gz'}: exists, but no sidecar a_alpha-0.json says "
        "what made it; delete a_alpha-0.nii.gz to make it again, or choose another output"
    ]
    assert no_record.stderr.count("mrisr: skipped:") == 3
    both = upsample(folder, out, *weights, "--skip-existing", "--overwrite")
    assert_one_line_error(both, "give one")


def error_lines(result: object) -> list[str]:
    return [
        line
        for line in result.stderr.splitlines()  # type: ignore[attr-defined]
        if line.startswith("mrisr: error:")
    ]


def test_skip_existing_goes_by_the_input_file_and_its_own_sidecar(
    tmp_path: Path, fast_weights: Path
) -> None:
    """A moved input folder is still the same input (its sha256); an input changed in place is
    not; out.nii next to out.nii.gz shares out.json, which --skip-existing must not delete."""
    first, out = tmp_path / "first", tmp_path / "out"
    first.mkdir()
    write_nifti(first / "a.nii.gz", head_phantom((30, 20, 30)))
    weights = ["--psnr-weights", fast_weights, *SMALL_PATCH]
    assert upsample(first, out, *weights).exit_code == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    again = upsample(moved, out, *weights, "--skip-existing")
    assert again.exit_code == 0 and "finished by an earlier run" in again.stderr, again.stderr
    write_nifti(moved / "a.nii.gz", head_phantom((30, 20, 30), seed=5))  # changed in place
    changed = upsample(moved, out, *weights, "--skip-existing")
    assert_one_line_error(changed, f"made by another run (input {first / 'a.nii.gz'})")

    single = tmp_path / "single.nii.gz"
    assert upsample(moved / "a.nii.gz", single, *weights).exit_code == 0
    write_nifti(moved / "a.nii.gz", head_phantom((30, 20, 30), seed=6))
    rerun = upsample(moved / "a.nii.gz", single, *weights, "--skip-existing")
    assert_one_line_error(
        rerun, "made by another run (its input has changed since: another sha256)"
    )
    (tmp_path / "single.json").write_text("[]")  # not a sidecar of mrisr: not deleted, refused
    foreign = upsample(moved / "a.nii.gz", single, *weights, "--skip-existing")
    assert_one_line_error(
        foreign, "single.json: exists and is not an mrisr sidecar; choose another"
    )
    assert (tmp_path / "single.json").read_text() == "[]"

    record = (out / "a.json").read_text()
    other = upsample(moved / "a.nii.gz", out / "a.nii", *weights, "--skip-existing")
    assert_one_line_error(other, "a.json: is the sidecar of a.nii.gz; choose another output")
    assert (out / "a.json").read_text() == record


@pytest.mark.parametrize("when", ["before its turn", "while it computes"])
def test_skip_existing_takes_an_output_another_run_finished_meanwhile(
    tmp_path: Path, fast_weights: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The same batch submitted twice: an output that the other run puts in place after this
    one's first check, before this one comes to it or while it computes it, is skipped (not
    redone where it can be seen in time), and no error: it was "already exists (use
    --overwrite to replace it)", exit 1, for outputs that were all fine."""
    import shutil

    from mrisr_cli import batch

    folder = tmp_path / "in"
    folder.mkdir()
    for name, seed in (("a", 0), ("b", 1)):
        write_nifti(folder / f"{name}.nii.gz", head_phantom((30, 20, 30), seed=seed))
    options = ["--psnr-weights", fast_weights, *SMALL_PATCH, "--skip-existing"]
    other, out = tmp_path / "other", tmp_path / "out"
    assert upsample(folder, other, *options).exit_code == 0  # what the other run writes

    def the_other_run_puts_b_in_place() -> None:
        for name in ("b.json", "b.nii.gz"):  # its sidecar first, as a run does
            shutil.copy2(other / name, out / name)

    real_prepare, real_upsample = batch.prepare_input, batch.upsample_prepared
    prepared: list[str] = []

    def prepare(path: Path, *args: object, **kwargs: object) -> object:
        prepared.append(path.name)
        if when == "before its turn" and path.name == "a.nii.gz":
            the_other_run_puts_b_in_place()
        return real_prepare(path, *args, **kwargs)

    def upsample_prepared(
        data: object, output: Path, generator: object, opts: object, progress: object = None
    ) -> object:
        def advance(done: int, total: int) -> None:
            if when == "while it computes" and output.name == "b.nii.gz" and done == total:
                the_other_run_puts_b_in_place()
            progress(done, total)  # type: ignore[operator]

        return real_upsample(data, output, generator, opts, advance)

    monkeypatch.setattr(batch, "prepare_input", prepare)
    monkeypatch.setattr(batch, "upsample_prepared", upsample_prepared)
    result = upsample(folder, out, *options)
    assert result.exit_code == 0, result.stderr
    assert error_lines(result) == []
    skipped = f"mrisr: skipped: {out / 'b.nii.gz'}: finished meanwhile by another run of"
    assert skipped in result.stderr
    assert prepared == (["a.nii.gz"] if when == "before its turn" else ["a.nii.gz", "b.nii.gz"])
    assert (out / "b.nii.gz").read_bytes() == (other / "b.nii.gz").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz", "b.json", "b.nii.gz"]


def test_skip_existing_checks_the_image_and_a_killed_write_leaves_no_image_alone(
    tmp_path: Path,
    psnr_weights: Path,
    gan_weights: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sidecar records the image's sha256: a truncated (or edited) image no longer counts as
    finished. The sidecar goes into place first, so a job stopped between the two renames leaves
    a sidecar without image (redone), not an image without sidecar (refused); and an input with
    one alpha finished is hashed once, not twice."""
    import os

    from mrisr_cli import batch, pipeline, volumes

    src = write_nifti(tmp_path / "a.nii.gz", head_phantom((30, 20, 30)))
    out = tmp_path / "out"
    weights = ["--psnr-weights", psnr_weights, "--gan-weights", gan_weights, *SMALL_PATCH]
    assert upsample(src, f"{out}/", *weights).exit_code == 0
    image = out / "a.nii.gz"
    record = json.loads((out / "a.json").read_text())
    assert record["output_sha256"] == sha256_of(image)
    image.write_bytes(image.read_bytes()[:-100])  # e.g. a node that crashed while copying
    damaged = upsample(src, f"{out}/", *weights, "--skip-existing")
    assert_one_line_error(
        damaged, f"{image}: is not the image its sidecar records (another sha256: changed or"
    )

    real_replace = os.replace

    sidecar_in_place: list[bool] = []

    def killed_at_the_image(tmp: str | Path, target: str | Path) -> None:
        if str(target).endswith(".nii.gz"):
            sidecar_in_place.append(Path(target).with_name(f"{stem(target)}.json").exists())
            raise KeyboardInterrupt  # stopped between the sidecar's rename and the image's
        real_replace(tmp, target)

    def stem(target: str | Path) -> str:
        return Path(target).name.removesuffix(".nii.gz")

    monkeypatch.setattr(volumes.os, "replace", killed_at_the_image)
    stopped = upsample(src, out / "b.nii.gz", *weights)
    assert stopped.exit_code != 0 and sidecar_in_place == [True]  # the sidecar went first
    assert not (out / "b.nii.gz").exists() and not (out / "b.json").exists()
    assert no_partial_files(out)
    # with --overwrite the earlier pair stays as it was, the earlier sidecar put back
    (out / "c.json").write_text(json.dumps({**record, "output": str(out / "c.nii.gz")}))
    (out / "c.nii.gz").write_bytes(b"the earlier image")
    earlier = (out / "c.json").read_bytes()
    replaced = upsample(src, out / "c.nii.gz", *weights, "--overwrite")
    assert replaced.exit_code != 0 and sidecar_in_place == [True, True]
    assert (out / "c.json").read_bytes() == earlier
    assert (out / "c.nii.gz").read_bytes() == b"the earlier image" and no_partial_files(out)
    monkeypatch.setattr(volumes.os, "replace", real_replace)
    for name in ("c.json", "c.nii.gz"):
        (out / name).unlink()

    hashed: list[Path] = []

    def counted(path: Path) -> str:
        hashed.append(Path(path))
        return sha256_of(path)

    monkeypatch.setattr(batch, "sha256_of", counted)
    monkeypatch.setattr(pipeline, "sha256_of", counted)
    image.unlink()
    (out / "a.json").unlink()
    assert upsample(src, out, *weights, "--alpha", "0,1").exit_code == 0
    (out / "a_alpha-0.nii.gz").unlink()  # its sidecar is left, as a killed job would leave it
    hashed.clear()
    resumed = upsample(src, out, *weights, "--alpha", "0,1", "--skip-existing")
    assert resumed.exit_code == 0, resumed.stderr
    assert "a_alpha-1.nii.gz: finished by an earlier run" in resumed.stderr
    assert hashed.count(src) == 1, hashed


def test_an_image_that_cannot_be_put_in_place_is_one_line_and_leaves_nothing(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's rename failing (a folder made read-only meanwhile, a quota) was a traceback
    that ended the whole batch."""
    import os

    from mrisr_cli import volumes

    real_replace = os.replace

    def refused(tmp: str | Path, target: str | Path) -> None:
        if str(target).endswith(".nii.gz"):
            raise PermissionError(13, "Permission denied")
        real_replace(tmp, target)

    monkeypatch.setattr(volumes.os, "replace", refused)
    out = tmp_path / "out"
    out.mkdir()
    result = upsample(phantom_file, out / "o.nii.gz", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert_one_line_error(result, f"{out / 'o.nii.gz'}: could not write (Permission denied)")
    assert list(out.iterdir()) == []


def test_a_bids_folder_runs_its_t1w_and_refuses_other_contrasts(
    tmp_path: Path, fast_weights: Path
) -> None:
    """`upsample bids/sub-01/anat/ out/` super-resolved the T2w beside the T1w without a word."""
    anat = tmp_path / "anat"
    anat.mkdir()
    write_nifti(anat / "sub-01_T1w.nii.gz", head_phantom((30, 20, 30)))
    write_nifti(anat / "sub-01_T2w.nii.gz", head_phantom((30, 20, 30), seed=3))
    out = tmp_path / "out"
    result = upsample(anat, f"{out}/", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert error_lines(result) == [
        f"mrisr: error: {anat / 'sub-01_T2w.nii.gz'}: its name marks it as T2w, not as a "
        "T1-weighted scan, which mrisr's models are for (name the *_T1w files, or rename this "
        "one if it is T1-weighted)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["sub-01_T1w.json", "sub-01_T1w.nii.gz"]


def test_wrote_lines_of_several_alphas_add_up_and_links_to_one_file_run_once(
    tmp_path: Path, psnr_weights: Path, gan_weights: Path
) -> None:
    src = write_nifti(tmp_path / "a.nii.gz", head_phantom((30, 20, 30)))
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "a.nii.gz").symlink_to(src)
    out = tmp_path / "out"
    weights = ["--psnr-weights", psnr_weights, "--gan-weights", gan_weights, *SMALL_PATCH]
    result = upsample(
        src, tmp_path / "links" / "a.nii.gz", f"{out}/", *weights, "--alpha", "0,1", "--n4"
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a_alpha-0.nii.gz", "a_alpha-1.nii.gz"]
    first, second = (json.loads((out / f"a_alpha-{a}.json").read_text())["seconds"] for a in "01")
    assert first["n4"] == second["n4"] > 0  # one fit, recorded in both

    def own(seconds: dict[str, float]) -> float:  # total less this output's own steps
        return seconds["total"] - seconds["network"] - seconds["write"]

    # the shared read and N4 count in the first total only (3-decimal rounding aside)
    assert own(first) == pytest.approx(first["read"] + first["n4"], abs=0.005)
    assert own(second) == pytest.approx(0.0, abs=0.005) and first["n4"] > 0


def test_a_folder_made_for_a_run_that_fails_before_any_input_is_removed(
    tmp_path: Path, phantom_file: Path
) -> None:
    out = tmp_path / "new"
    missing = tmp_path / "nope.safetensors"
    write_nifti(tmp_path / "b.nii.gz", head_phantom((30, 20, 30)))
    result = upsample(phantom_file, tmp_path / "b.nii.gz", f"{out}/", "--psnr-weights", missing)
    assert_one_line_error(result, "no such weights file")
    assert not out.exists()


def test_a_failing_run_leaves_a_folder_another_run_made_meanwhile(
    tmp_path: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs given one new output folder: the other one makes it while this one starts (its
    torch import takes seconds), then this one fails. The folder was removed, and the other job
    then failed every output ("output folder does not exist")."""
    from mrisr_cli import threads

    out = tmp_path / "out"
    real = threads.configure_threads

    def the_other_job_makes_the_folder(count: int | None = None) -> int:
        out.mkdir()
        return real(count)

    monkeypatch.setattr(threads, "configure_threads", the_other_job_makes_the_folder)
    missing = tmp_path / "nope.safetensors"
    assert_one_line_error(upsample(phantom_file, f"{out}/", "--psnr-weights", missing), "nope")
    assert out.is_dir()


def test_a_failing_run_keeps_the_folder_it_made_while_another_run_holds_it(
    tmp_path: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This job makes the new folder; another one, started just after, plans into it (holding it
    with a shared lock, as every run holds its output folder) and computes; this one fails. The
    folder stays for the other job, which has not written anything yet."""
    import fcntl

    from mrisr_cli import pipeline

    out = tmp_path / "out"
    real = pipeline.load_generator_files
    held: list[int] = []

    def the_other_job_plans(psnr: Path | None, gan: Path | None) -> object:
        held.append(os.open(out, os.O_RDONLY | os.O_DIRECTORY))
        fcntl.flock(held[0], fcntl.LOCK_SH)
        return real(psnr, gan)

    monkeypatch.setattr(pipeline, "load_generator_files", the_other_job_plans)
    missing = tmp_path / "nope.safetensors"
    try:
        result = upsample(phantom_file, f"{out}/", "--psnr-weights", missing)
        assert_one_line_error(result, "nope")
        assert out.is_dir()
    finally:
        for fd in held:
            os.close(fd)


def test_an_output_folder_made_by_another_run_just_before_this_one_is_used(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs of an array make the same new folder at once: the one that loses the race was
    stopped by FileExistsError ("internal error", exit 3); it writes into the folder."""
    from mrisr_cli import batch

    out = tmp_path / "out"
    real = batch.check_output_path

    def the_other_job_makes_it_just_after_the_check(path: Path, *, overwrite: bool) -> None:
        real(path, overwrite=overwrite)
        if path == out and not out.exists():
            out.mkdir()

    monkeypatch.setattr(batch, "check_output_path", the_other_job_makes_it_just_after_the_check)
    result = upsample(phantom_file, f"{out}/", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["phantom.json", "phantom.nii.gz"]


def test_a_link_to_a_missing_folder_as_output_folder_is_one_line(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    """It was "internal error: FileExistsError"; nothing is made, the link stays as it was."""
    link = tmp_path / "sr"
    link.symlink_to(tmp_path / "gone")
    other = write_nifti(tmp_path / "b.nii.gz", head_phantom((30, 20, 30)))
    for given in (f"{link}/", str(link)):  # a folder for several inputs, also without the /
        result = upsample(phantom_file, other, given, "--psnr-weights", fast_weights)
        assert_one_line_error(result, f"{link}: output folder is a link to a missing folder")
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_hand_made_records_are_refused_or_ignored_without_a_traceback(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    """A sidecar whose weights entry is not a list of records is 'other weights'; a weights
    file whose provenance is not a mapping gives no provenance warning."""
    from mrisr_cli.pipeline import load_generator_files

    out = tmp_path / "o.nii.gz"
    assert upsample(phantom_file, out, "--psnr-weights", fast_weights, *SMALL_PATCH).exit_code == 0
    record = json.loads((tmp_path / "o.json").read_text())
    for weights in ("x", [None, {"sha256": 1}]):
        (tmp_path / "o.json").write_text(json.dumps({**record, "weights": weights}))
        again = upsample(
            phantom_file, out, "--psnr-weights", fast_weights, *SMALL_PATCH, "--skip-existing"
        )
        assert_one_line_error(again, "made by another run (other weights)")
    torch.manual_seed(0)
    odd = tmp_path / "odd.safetensors"
    save_weights(odd, build_network(TINY_FAST).state_dict(), TINY_FAST, NO_N4, provenance=[1])  # type: ignore[arg-type]
    assert load_generator_files(odd, fast_weights).warnings() == []


def test_an_input_named_twice_is_run_once(tmp_path: Path, fast_weights: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", head_phantom((30, 20, 30)))
    out = tmp_path / "out"
    args = [tmp_path / "a.nii.gz", f"{tmp_path}/./a.nii.gz", tmp_path, out]
    result = upsample(*args, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz"]


@pytest.mark.parametrize("meanwhile", ["nothing", "a new sidecar", "the image"])
def test_a_stale_sidecar_is_removed_only_as_it_was_read_and_still_alone(
    tmp_path: Path, psnr_weights: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """A sidecar whose image is gone is removed by --skip-existing, unless another run (a task
    resubmitted while it still ran) placed a new sidecar or its image after it was checked."""
    from mrisr_cli import batch
    from mrisr_cli.pipeline import UpsampleOptions, load_generator_files

    src = write_nifti(tmp_path / "a.nii.gz", head_phantom((30, 20, 30)))
    outputs = [tmp_path / "out.nii.gz", tmp_path / "next.nii.gz"]
    for output in outputs:
        assert upsample(src, output, "--psnr-weights", psnr_weights, *SMALL_PATCH).exit_code == 0
        output.unlink()  # both sidecars are stale
    image, sidecar = outputs[0], tmp_path / "out.json"
    read_sidecar = batch._read_sidecar

    def another_run_writes_while_the_next_job_is_checked(path: Path) -> dict:
        if path.name == "next.json" and meanwhile == "a new sidecar":  # renamed: new inode
            newer = {**json.loads(sidecar.read_text()), "alpha": 0.5}
            (tmp_path / "new.json").write_text(json.dumps(newer))
            os.replace(tmp_path / "new.json", sidecar)
        elif path.name == "next.json" and meanwhile == "the image":
            image.write_bytes(b"the other run's image")
        return read_sidecar(path)

    monkeypatch.setattr(batch, "_read_sidecar", another_run_writes_while_the_next_job_is_checked)
    jobs = [batch.UpsampleJob(src, output, 1.0) for output in outputs]
    resume = batch.split_finished(jobs, load_generator_files(psnr_weights, None), UpsampleOptions())
    assert resume.to_run == jobs and not (tmp_path / "next.json").exists()
    if meanwhile == "nothing":
        assert not sidecar.exists()
    else:  # the other run's files are left to it
        assert sidecar.exists()
        assert (json.loads(sidecar.read_text())["alpha"] == 0.5) == (meanwhile == "a new sidecar")


def test_a_link_to_a_missing_file_in_a_folder_is_reported_not_skipped(
    tmp_path: Path, fast_weights: Path
) -> None:
    """DataLad content not fetched yet: a dangling link among the inputs is an error line."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_nifti(folder / "a.nii.gz", head_phantom((30, 20, 30)))
    (folder / "b.nii.gz").symlink_to(tmp_path / "annex" / "missing.nii.gz")
    out = tmp_path / "out"
    result = upsample(folder, out, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("mrisr: error:")]
    assert errors == [
        f"mrisr: error: {folder / 'b.nii.gz'}: a link to a missing file (in a DataLad dataset, "
        "run datalad get first)"
    ], result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz"]


def test_an_input_folder_that_cannot_be_listed_is_an_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mrisr_cli import batch
    from mrisr_cli.errors import InputError

    def refuse(folder: Path) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(batch, "image_files", refuse)
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match=r"in: folder cannot be read \(Permission denied\)"):
        batch.expand_inputs([tmp_path / "in"])


def test_every_alpha_is_checked_before_the_first_runs(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    out = tmp_path / "o.nii.gz"
    result = upsample(
        phantom_file, out, "--psnr-weights", fast_weights, *SMALL_PATCH, "--alpha", "1,0.5"
    )
    assert_one_line_error(result, "--alpha 0.5 blends in a GAN model: give --gan-weights too")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.safetensors", "phantom.nii.gz"]


def test_a_sidecar_that_cannot_be_written_takes_its_image_with_it(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the sidecar: no image is left that would pass for a finished output."""
    import errno

    from mrisr_cli import pipeline

    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_sidecar", full)
    out = tmp_path / "o.nii.gz"
    result = upsample(phantom_file, out, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert_one_line_error(result, "o.json: cannot be written (No space left on device); ")
    assert f"{out} was not written either" in result.stderr
    assert not out.exists() and no_partial_files(tmp_path)


def test_a_refused_plan_makes_no_output_folder(tmp_path: Path, fast_weights: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_nifti(tmp_path / name / "sub.nii.gz", head_phantom((30, 20, 30)))
    new = tmp_path / "new"
    result = upsample(
        tmp_path / "a/sub.nii.gz", tmp_path / "b/sub.nii.gz", new, "--psnr-weights", fast_weights
    )
    assert_one_line_error(result, "would both write")
    assert str(tmp_path / "a/sub.nii.gz") in result.stderr
    assert str(tmp_path / "b/sub.nii.gz") in result.stderr
    assert not new.exists()


def test_freesurfer_output_names_write_mgh(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    """`mrisr degrade` writes .mgz, so `upsample` does too: the same voxels and affine as the
    NIfTI output, and alpha tags keep the suffix as typed."""
    nii, mgz = tmp_path / "n.nii.gz", tmp_path / "m.mgz"
    weights = ["--psnr-weights", fast_weights, "--gan-weights", fast_weights]
    for out in (nii, mgz):
        result = upsample(phantom_file, out, *weights, *SMALL_PATCH)
        assert result.exit_code == 0, result.stderr
    assert isinstance(nib.load(mgz), nib.MGHImage) and (tmp_path / "m.json").is_file()
    np.testing.assert_array_equal(nib.load(mgz).get_fdata(), nib.load(nii).get_fdata())
    np.testing.assert_allclose(nib.load(mgz).affine, nib.load(nii).affine, atol=1e-5)
    tagged = upsample(phantom_file, tmp_path / "t.MGZ", *weights, "--alpha", "0,1", *SMALL_PATCH)
    assert tagged.exit_code == 0, tagged.stderr
    for name in ("t_alpha-0.MGZ", "t_alpha-1.MGZ"):
        assert isinstance(nib.load(tmp_path / name), nib.MGHImage)


def test_trailing_slash_names_a_new_folder_and_repeated_alphas_count_once(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    out = tmp_path / "new"
    result = upsample(
        phantom_file, f"{out}/", "--psnr-weights", fast_weights, "--alpha", "1,1.0", *SMALL_PATCH
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["phantom.json", "phantom.nii.gz"]


def offset_weights(path: Path, offset: float) -> Path:
    """A network that answers ``offset`` (in z-score units) whatever its input."""
    model = build_network(TINY_FAST)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.zero_()
        [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1].bias.fill_(offset)
    save_weights(path, model.state_dict(), TINY_FAST, NO_N4)
    return path


def test_output_of_a_nonnegative_image_stays_nonnegative_after_n4(
    tmp_path: Path, phantom_file: Path
) -> None:
    """N4 moves the exact-zero background slightly below zero (about -0.014 on this phantom):
    the clip must follow the input image, not the corrected array. The network here answers a
    constant far below the image's range, so an unclipped output would be negative."""
    weights = offset_weights(tmp_path / "negative.safetensors", -10.0)
    out = tmp_path / "o.nii.gz"
    result = upsample(
        phantom_file, out, "--psnr-weights", weights, "--n4", "--no-keep-background", *SMALL_PATCH
    )
    assert result.exit_code == 0, result.stderr
    assert float(np.asarray(nib.load(out).dataobj).min()) >= 0.0


def test_n4_field_is_put_back_unless_the_corrected_output_is_asked_for(
    tmp_path: Path, fast_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network sees N4-corrected intensities; the output gets the input's bias field back, so
    that it compares with the input's own reference (degrade -> upsample -> evaluate). With a
    network that returns its input, the default output is the input again, and --bias-corrected
    gives N4's correction of it."""
    from mrisr_cli import pipeline
    from mrisr_cli.n4 import n4_correct

    monkeypatch.setattr(pipeline, "super_resolve", lambda data, *args: data.copy())
    clean = head_phantom()
    ramp = np.linspace(0.75, 1.25, clean.shape[0], dtype=np.float32)[:, None, None]
    biased = clean * ramp
    src = write_nifti(tmp_path / "biased.nii.gz", biased)
    shaded, flat = tmp_path / "shaded.nii.gz", tmp_path / "flat.nii.gz"
    base = ["--psnr-weights", fast_weights, "--n4", "--no-keep-background"]
    assert upsample(src, shaded, *base).exit_code == 0
    result = upsample(src, flat, *base, "--bias-corrected")
    assert result.exit_code == 0, result.stderr
    out_shaded = np.asarray(nib.load(shaded).dataobj)
    out_flat = np.asarray(nib.load(flat).dataobj)
    np.testing.assert_allclose(out_shaded, biased, atol=1e-3 * biased.max())
    np.testing.assert_allclose(
        out_flat, n4_correct(biased, (1.0, 1.0, 1.0)), atol=1e-3 * biased.max()
    )
    assert np.abs(out_flat - biased).max() > 0.05 * biased.max()  # the field was there to remove

    def sidecar(path: Path) -> dict:
        return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())

    assert sidecar(shaded)["bias_field"] == "restored" and sidecar(flat)["bias_field"] == "removed"
    # with the flat background kept (the default), the zeros around the head stay exactly 0 and
    # the head is the input again: the rule and the field's return do not disturb each other
    kept = tmp_path / "kept.nii.gz"
    assert upsample(src, kept, "--psnr-weights", fast_weights, "--n4").exit_code == 0
    out_kept = np.asarray(nib.load(kept).dataobj)
    assert (out_kept[biased == 0] == 0).all()
    np.testing.assert_allclose(out_kept, biased, atol=1e-3 * biased.max())
    refused = upsample(
        src, tmp_path / "x.nii.gz", "--psnr-weights", fast_weights, "--no-n4", "--bias-corrected"
    )
    assert refused.exit_code != 0 and "--bias-corrected" in refused.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def kept_and_raw(src: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``src`` through a network that adds 3 SD everywhere, with the flat background kept (the
    default) and without (--no-keep-background)."""
    weights = offset_weights(tmp_path / "offset.safetensors", 3.0)
    kept, raw = tmp_path / "kept.nii.gz", tmp_path / "raw.nii.gz"
    assert upsample(src, kept, "--psnr-weights", weights, *SMALL_PATCH).exit_code == 0
    result = upsample(src, raw, "--psnr-weights", weights, "--no-keep-background", *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    return np.asarray(nib.load(kept).dataobj), np.asarray(nib.load(raw).dataobj)


def test_the_flat_background_of_a_masked_scan_stays_as_it_was(tmp_path: Path) -> None:
    """A skull-stripped scan's zero background comes out zero although the network adds an
    offset everywhere; a zero-valued pocket inside the head (not reaching the image's faces)
    gets the network's output; --no-keep-background gives the network's output everywhere."""
    data = head_phantom()
    inside = (20, 18, 22)  # the phantom's centre: inside the brain
    pocket = tuple(slice(i - 1, i + 2) for i in inside)
    data[pocket] = 0
    src = write_nifti(tmp_path / "stripped.nii.gz", data)
    kept_data, raw_data = kept_and_raw(src, tmp_path)
    background = data == 0
    background[pocket] = False
    assert (raw_data[background] > 0).mean() > 0.5  # the offset reaches the background...
    assert (kept_data[background] == 0).all()  # ...unless it is kept
    assert kept_data[inside] == raw_data[inside] > 0  # the pocket inside is the network's
    np.testing.assert_array_equal(kept_data[~background], raw_data[~background])
    record = json.loads((tmp_path / "kept.json").read_text())
    assert record["keep_background"] is True
    assert record["background_voxels_kept"] == int(background.sum())
    assert json.loads((tmp_path / "raw.json").read_text())["background_voxels_kept"] == 0


def test_tiles_of_air_keep_the_input_unless_no_keep_background(tmp_path: Path) -> None:
    """Tiles holding only air are not run by default (they keep the input's values, as
    documented); --no-keep-background gives the network's output there too."""
    rng = np.random.default_rng(0)
    data = rng.uniform(0.1, 0.6, (80, 36, 88)).astype(np.float32)  # noisy air: nothing flat
    data[20:60, :, 22:66] += head_phantom((40, 36, 44))
    src = write_nifti(tmp_path / "head_in_air.nii.gz", data)
    kept_data, raw_data = kept_and_raw(src, tmp_path)
    corner = (slice(0, 10), slice(None), slice(0, 10))  # in a tile of air only
    np.testing.assert_allclose(kept_data[corner], data[corner], atol=1e-4)  # via z-scores
    assert (raw_data[corner] > data[corner] + 1).all()  # the network's offset of 3 SD
    head = (slice(30, 50), slice(10, 26), slice(32, 56))
    np.testing.assert_array_equal(kept_data[head], raw_data[head])
    assert json.loads((tmp_path / "raw.json").read_text())["keep_background"] is False


def test_skip_existing_refuses_an_earlier_versions_no_keep_background_output(
    tmp_path: Path,
) -> None:
    """Sidecars written before the air-tile rule was recorded: a default output is the same
    today and is finished; a --no-keep-background one kept tiles of air in early versions (not in
    later ones, which the sidecar cannot tell apart), so it is not."""
    data = np.random.default_rng(0).uniform(0.1, 0.6, (80, 36, 88)).astype(np.float32)
    data[20:60, :, 22:66] += head_phantom((40, 36, 44))
    src = write_nifti(tmp_path / "head_in_air.nii.gz", data)
    kept_and_raw(src, tmp_path)
    weights = ["--psnr-weights", tmp_path / "offset.safetensors", *SMALL_PATCH]
    for name, now in (("kept", "input"), ("raw", "network")):
        sidecar = tmp_path / f"{name}.json"
        record = json.loads(sidecar.read_text())
        assert record.pop("air_tiles") == now
        sidecar.write_text(json.dumps(record))  # as an earlier version wrote it
    kept = upsample(src, tmp_path / "kept.nii.gz", *weights, "--skip-existing")
    assert kept.exit_code == 0 and "finished by an earlier run" in kept.stderr, kept.stderr
    raw = upsample(
        src, tmp_path / "raw.nii.gz", *weights, "--no-keep-background", "--skip-existing"
    )
    assert_one_line_error(raw, "made by another run (air_tiles not recorded (an earlier version's")


def test_a_non_finite_network_output_is_an_error_not_a_file(
    tmp_path: Path, phantom_file: Path
) -> None:
    """An output that overflows (fp16 on a GPU, or weights like these) must not be written."""
    weights = offset_weights(tmp_path / "overflow.safetensors", 3e38)
    out = tmp_path / "o.nii.gz"
    result = upsample(phantom_file, out, "--psnr-weights", weights, *SMALL_PATCH)
    assert_one_line_error(result, "NaN or infinite values")
    assert "fp16" not in result.stderr  # it ran in fp32: no advice about --half
    assert not out.exists() and no_partial_files(tmp_path)


def test_intensities_near_the_float32_limit_are_processed(tmp_path: Path) -> None:
    """Their standard deviation overflowed in float32 above 1.8e19: "NaN or infinite values"
    (with advice about an fp16 overflow in an fp32 run), or an internal error."""
    data = head_phantom() * np.float32(1e36)
    src = write_nifti(tmp_path / "huge.nii.gz", data)
    weights = offset_weights(tmp_path / "plus_one_sd.safetensors", 1.0)
    out = tmp_path / "o.nii.gz"
    result = upsample(src, out, "--psnr-weights", weights, "--no-keep-background", *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    stats = foreground_stats(data.astype(np.float64))
    np.testing.assert_allclose(nib.load(out).get_fdata(), stats.mean + stats.std, rtol=1e-4)


def test_half_falling_back_to_fp32_is_recorded_in_the_sidecar(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    from mrisr_cli.inference import fast_half_available

    if fast_half_available("cpu"):
        pytest.skip("this CPU runs bf16 natively: --half does not fall back")
    out = tmp_path / "o.nii.gz"
    result = upsample(phantom_file, out, "--psnr-weights", fast_weights, "--half", *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "o.json").read_text())
    assert record["precision"] == "fp32" and not record["half"]
    assert any(w.startswith("--half:") and "fp32" in w for w in record["warnings"])
    assert result.stderr.count("--half:") == 1  # printed once for the run


_KILL_WHILE_WRITING = """
import os, signal, sys
from contextlib import contextmanager
from mrisr_cli import volumes
real = volumes.atomic_path

@contextmanager
def atomic_path(path, *, overwrite):
    with real(path, overwrite=overwrite) as tmp:
        yield tmp
        if tmp.name.endswith(".nii.gz"):  # written, not yet renamed: a SLURM time limit hits
            os.kill(os.getpid(), signal.SIGTERM)

volumes.atomic_path = atomic_path
from mrisr_cli.cli import main
sys.argv = ["mrisr", *sys.argv[1:]]
main()
"""


def test_sigterm_while_writing_leaves_nothing_and_says_so(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILL_WHILE_WRITING,
            "upsample",
            str(phantom_file),
            str(out / "o.nii.gz"),
            "--psnr-weights",
            str(fast_weights),
            *SMALL_PATCH,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 128 + 15, run.stderr
    assert run.stderr.strip().splitlines() == [
        "mrisr: error: stopped by SIGTERM; unfinished outputs were removed"
    ]
    assert list(out.iterdir()) == []


def test_sigterm_during_n4_stops_at_once_and_leaves_nothing(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    """ANTs's N4 ran in the main process, deaf to signals (and holding the GIL) for its minutes
    on a whole head: a SIGTERM was acted on 104 s late, after SLURM's SIGKILL (30 s) or docker
    stop's (10 s)."""
    out, started = tmp_path / "out", tmp_path / "started"
    out.mkdir()
    command = [
        *(sys.executable, "-c", n4_stop_script("pipeline", "n4_fit"), str(started), "upsample"),
        *(str(phantom_file), str(out / "o.nii.gz"), "--n4", "--threads", "1"),
        *("--psnr-weights", str(fast_weights), *SMALL_PATCH),
    ]
    assert sigterm_once_started(command, started) == [
        "mrisr: error: stopped by SIGTERM; unfinished outputs were removed"
    ]
    assert list(out.iterdir()) == []


def test_the_zero_background_of_a_true_lowres_scan_stays_zero(tmp_path: Path) -> None:
    """A 2 x 1 x 2 mm skull-stripped scan is interpolated onto 1 mm (linearly, so its zeros
    stay exact zeros) and its background comes out zero although the network adds an offset."""
    data = head_phantom((40, 36, 44))[::2, :, ::2]
    src = write_nifti(tmp_path / "low.nii.gz", data, np.diag([2.0, 1.0, 2.0, 1.0]))
    kept_data, raw_data = kept_and_raw(src, tmp_path)
    assert kept_data.shape == (40, 36, 44)
    fine = np.zeros(kept_data.shape, dtype=bool)  # coarse voxel j lies on fine voxel 2j
    fine[::2, :, ::2] = data == 0
    assert (raw_data[fine] > 0).mean() > 0.5  # the offset reaches the background...
    assert (kept_data[fine] == 0).all()  # ...unless it is kept
    changed = kept_data != raw_data
    assert (kept_data[changed] == 0).all()  # nothing but background was changed
    record = json.loads((tmp_path / "kept.json").read_text())
    assert record["background_voxels_kept"] >= int(fine.sum())


def test_true_lowres_input_is_written_on_the_fine_grid(tmp_path: Path, fast_weights: Path) -> None:
    hr = write_nifti(tmp_path / "hr.nii.gz", head_phantom((40, 36, 44)))
    low = tmp_path / "low.nii.gz"
    lr = tmp_path / "lr.nii.gz"
    assert (
        runner.invoke(app, ["degrade", str(hr), str(lr), "--keep-lowres", str(low)]).exit_code == 0
    )
    out = tmp_path / "sr.nii.gz"
    result = upsample(low, out, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    image = nib.load(out)
    assert image.shape == (40, 36, 44)
    np.testing.assert_allclose(image.affine, np.eye(4), atol=1e-6)
    # the same network on the degraded file (already on the fine grid) gives the same result
    same = tmp_path / "sr_from_lr.nii.gz"
    assert upsample(lr, same, "--psnr-weights", fast_weights, *SMALL_PATCH).exit_code == 0
    np.testing.assert_allclose(
        np.asarray(image.dataobj), np.asarray(nib.load(same).dataobj), atol=1e-3
    )


# --- bad input: one clear line, non-zero exit, no traceback, no partial file ---------------


def test_missing_input(tmp_path: Path, fast_weights: Path) -> None:
    result = upsample(
        tmp_path / "nope.nii.gz", tmp_path / "o.nii.gz", "--psnr-weights", fast_weights
    )
    assert_one_line_error(result, "no such file")


def test_not_a_nifti(tmp_path: Path, fast_weights: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("hello")
    result = upsample(bad, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights)
    assert_one_line_error(result, "not a NIfTI")
    assert not (tmp_path / "o.nii.gz").exists() and no_partial_files(tmp_path)


def test_truncated_gzip(tmp_path: Path, fast_weights: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", head_phantom((30, 20, 30)))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = upsample(cut, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights)
    assert_one_line_error(result, "truncated or corrupt")
    assert not (tmp_path / "o.nii.gz").exists()


def test_4d_with_several_volumes(tmp_path: Path, fast_weights: Path) -> None:
    src = write_nifti(tmp_path / "4d.nii.gz", np.ones((10, 10, 10, 3)))
    assert_one_line_error(
        upsample(src, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights), "3D"
    )


def test_4d_with_one_volume_is_accepted(tmp_path: Path, fast_weights: Path) -> None:
    src = write_nifti(tmp_path / "4d.nii.gz", head_phantom((30, 20, 30))[..., None])
    result = upsample(src, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    assert nib.load(tmp_path / "o.nii.gz").shape == (30, 20, 30)


def test_all_zeros(tmp_path: Path, fast_weights: Path) -> None:
    src = write_nifti(tmp_path / "zeros.nii.gz", np.zeros((20, 20, 20)))
    assert_one_line_error(
        upsample(src, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights), "empty"
    )


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf(tmp_path: Path, fast_weights: Path, bad_value: float) -> None:
    data = head_phantom((20, 20, 20))
    data[3, 4, 5] = bad_value
    src = write_nifti(tmp_path / "bad.nii.gz", data)
    assert_one_line_error(
        upsample(src, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights), "NaN"
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_integer_dtypes_are_read_and_written_as_float(
    tmp_path: Path, fast_weights: Path, dtype: type
) -> None:
    src = write_nifti(tmp_path / "int.nii.gz", head_phantom((30, 20, 30)), dtype=dtype)
    result = upsample(src, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    out = nib.load(tmp_path / "o.nii.gz")
    assert out.get_data_dtype() == np.float32 and np.isfinite(out.get_fdata()).all()


def test_volume_smaller_than_one_patch(tmp_path: Path, fast_weights: Path) -> None:
    src = write_nifti(tmp_path / "small.nii.gz", head_phantom((12, 9, 14)))
    result = upsample(src, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights)
    assert result.exit_code == 0, result.stderr
    assert nib.load(tmp_path / "o.nii.gz").shape == (12, 9, 14)


def test_a_tiling_that_wastes_most_of_each_patch_runs_with_a_warning(
    tmp_path: Path, fast_weights: Path
) -> None:
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom((16, 12, 16)))
    out = tmp_path / "o.nii.gz"
    result = upsample(src, out, "--psnr-weights", fast_weights, "--patch", "10,10,10")
    assert result.exit_code == 0, result.stderr
    assert "--patch 10,10,10 with --margin 3 and --overlap 0 keeps 6%" in result.stderr
    assert nib.load(out).shape == (16, 12, 16)
    result = upsample(src, tmp_path / "o2.nii.gz", "--psnr-weights", fast_weights)
    assert result.exit_code == 0 and "keeps" not in result.stderr


def test_strongly_oblique_affine_is_refused(tmp_path: Path, fast_weights: Path) -> None:
    angle = np.radians(45)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    src = write_nifti(tmp_path / "oblique.nii.gz", head_phantom((30, 20, 30)), affine)
    assert_one_line_error(
        upsample(src, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights), "oblique"
    )


def test_slightly_oblique_affine_is_processed_with_a_warning(
    tmp_path: Path, fast_weights: Path
) -> None:
    angle = np.radians(8)
    affine = np.eye(4)
    affine[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    src = write_nifti(tmp_path / "oblique.nii.gz", head_phantom((30, 20, 30)), affine)
    out = tmp_path / "o.nii.gz"
    result = upsample(src, out, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    assert "warning" in result.stderr and "oblique" in result.stderr
    np.testing.assert_allclose(nib.load(out).affine, affine)
    several = upsample(
        src, tmp_path / "a.nii.gz", "--psnr-weights", fast_weights, "--gan-weights", fast_weights,
        "--alpha", "0,0.5,1", *SMALL_PATCH,
    )  # fmt: skip
    assert several.exit_code == 0, several.stderr
    assert several.stderr.count("degrees oblique") == 1  # the input's warning, not one per alpha


def test_existing_output_is_not_replaced(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"precious")
    assert_one_line_error(
        upsample(phantom_file, out, "--psnr-weights", fast_weights), "--overwrite"
    )
    assert out.read_bytes() == b"precious"


def test_output_folder_not_writable(tmp_path: Path, fast_weights: Path, phantom_file: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = upsample(phantom_file, locked / "o.nii.gz", "--psnr-weights", fast_weights)
        if result.exit_code == 0:  # root ignores permissions
            pytest.skip("running as a user that can write anywhere")
        assert_one_line_error(result, "not writable")
    finally:
        locked.chmod(0o700)


def test_output_folder_refusing_writes(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root the permission test above cannot fail; here the folder refuses every write."""
    import tempfile

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = upsample(phantom_file, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights)
    assert_one_line_error(result, "not writable")
    assert not (tmp_path / "o.nii.gz").exists()


def test_output_folder_missing(tmp_path: Path, fast_weights: Path, phantom_file: Path) -> None:
    result = upsample(phantom_file, tmp_path / "no" / "o.nii.gz", "--psnr-weights", fast_weights)
    assert_one_line_error(result, "does not exist")


def test_weights_of_another_kind(tmp_path: Path, phantom_file: Path) -> None:
    pth = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(1)}, pth)
    assert_one_line_error(
        upsample(phantom_file, tmp_path / "o.nii.gz", "--psnr-weights", pth), "pickle"
    )
    disc = tmp_path / "disc.safetensors"
    from conftest import tiny_weights

    from mrisr_cli.networks import NetworkConfig

    tiny_weights(disc, 0, NetworkConfig("patch_discriminator", {"base_features": 2}))
    assert_one_line_error(
        upsample(phantom_file, tmp_path / "o.nii.gz", "--psnr-weights", disc), "discriminator"
    )


def test_blending_two_different_networks_is_refused(
    tmp_path: Path, fast_weights: Path, psnr_weights: Path, phantom_file: Path
) -> None:
    result = upsample(
        phantom_file,
        tmp_path / "o.nii.gz",
        "--psnr-weights",
        psnr_weights,
        "--gan-weights",
        fast_weights,
        "--alpha",
        "0.5",
    )
    assert_one_line_error(result, "different networks")


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "abc", "0,,1", "0.5,"])
def test_alpha_outside_unit_interval(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, alpha: str
) -> None:
    result = upsample(
        phantom_file, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights, "--alpha", alpha
    )
    assert_one_line_error(result, "--alpha")


def test_alpha_below_one_needs_a_gan_model(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    result = upsample(
        phantom_file, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights, "--alpha", "0.5"
    )
    assert_one_line_error(result, "--gan-weights")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(tmp_path: Path, fast_weights: Path, phantom_file: Path) -> None:
    result = upsample(
        phantom_file, tmp_path / "o.nii.gz", "--psnr-weights", fast_weights, "--device", "cuda"
    )
    assert_one_line_error(result, "no CUDA GPU")


def test_no_weights_installed(
    tmp_path: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mrisr_cli import pipeline

    monkeypatch.setenv("MRISR_WEIGHTS", str(tmp_path / "empty"))
    assert_one_line_error(
        upsample(phantom_file, tmp_path / "o.nii.gz"),
        f"MRISR_WEIGHTS={tmp_path / 'empty'}: that folder holds no rrdg_psnr.safetensors",
    )
    monkeypatch.delenv("MRISR_WEIGHTS")
    monkeypatch.setattr(pipeline, "default_weights_dir", lambda: tmp_path / "empty")
    assert_one_line_error(upsample(phantom_file, tmp_path / "o.nii.gz"), "no trained weights")
    named_folder = upsample(phantom_file, tmp_path / "o.nii.gz", "--psnr-weights", tmp_path)
    assert_one_line_error(named_folder, f"{tmp_path}: is a folder; name a .safetensors file")


def test_console_script_reports_usage_and_library_errors_without_traceback(tmp_path: Path) -> None:
    """The installed entry point (python -m mrisr_cli) as a user runs it."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrisr_cli",
            "upsample",
            str(tmp_path / "x.nii.gz"),
            str(tmp_path / "y.nii.gz"),
            "--psnr-weights",
            str(tmp_path / "w.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.strip().startswith("mrisr: error:") and "Traceback" not in run.stderr
    version = subprocess.run(
        [sys.executable, "-m", "mrisr_cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("mrisr ")


@pytest.mark.parametrize(
    ("args", "expected", "command"),
    [
        (["upsample", "a.nii", "b.nii", "--batch-size", "0"], "'--batch-size'", "upsample"),
        (["train", "--time-limit", "-1"], "'--time-limit'", "train"),
        (["evaluate"], "Missing option '--ref'", "evaluate"),
        (["upsample", "a.nii", "b.nii", "--alpha"], "'--alpha' requires an argument", "upsample"),
        (["--threads", "2"], "No such option", ""),
        (["nosuch"], "No such command", ""),
        (["upsample", "in.nii.gz"], "'PATHS': give at least one input and an output", "upsample"),
        (["upsampel", "a", "b"], "Did you mean 'upsample'? (see", ""),
    ],
)
def test_console_script_usage_errors_are_one_line(
    args: list[str], expected: str, command: str
) -> None:
    """Typer's range and missing-argument errors get the same one-line format as library errors
    (not a multi-line box), with click's exit code 2 and nothing on stdout, and send the user to
    the help of the command they typed (also where click fails before making its context)."""
    run = subprocess.run(
        [sys.executable, "-m", "mrisr_cli", *args], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert ": error: " in lines[0] and expected in lines[0]
    named = f"python -m mrisr_cli {command}".strip()
    assert lines[0].startswith(f"{named}: error: ") and f"see '{named} --help'" in lines[0]
    assert run.stdout == ""


@pytest.mark.slow
def test_real_t1_whole_volume_keeps_geometry(tmp_path: Path, fast_weights: Path) -> None:
    path = real_volume("t1/S08_stroke_T1.nii.gz")
    out = tmp_path / "sr.nii.gz"
    result = upsample(path, out, "--psnr-weights", fast_weights, "--batch-size", "8")
    assert result.exit_code == 0, result.stderr
    source, written = nib.load(path), nib.load(out)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    data = np.asarray(written.dataobj)
    assert np.isfinite(data).all() and data.std() > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "shape", "ok"),
    [
        ("lowres/L04_antsxnet_testData2mm.nii.gz", (176, 240, 256), True),
        ("lowres/L01_spm_MoAE_t1.nii.gz", None, False),  # 3 mm slices: beyond a x2 model
        ("lowres/L03_mne_sample_T1_3mm.mgz", None, False),
    ],
)
def test_real_lowres_acquisitions(
    tmp_path: Path, fast_weights: Path, name: str, shape: tuple[int, int, int] | None, ok: bool
) -> None:
    path = real_volume(name)
    out = tmp_path / "sr.nii.gz"
    result = upsample(path, out, "--psnr-weights", fast_weights, "--batch-size", "8")
    if not ok:
        assert_one_line_error(result, "coarser than")
        return
    assert result.exit_code == 0, result.stderr
    image = nib.load(out)
    assert image.shape == shape
    assert np.allclose(image.header.get_zooms(), 1.0)
    assert "sharpens only 2" in result.stderr  # 2 mm on all three axes


def test_readme_lists_every_key_of_the_sidecar(
    tmp_path: Path, fast_weights: Path, phantom_file: Path
) -> None:
    """README's sidecar table names exactly the keys a sidecar holds, so neither drifts."""
    from conftest import REPO

    out = tmp_path / "o.nii.gz"
    result = upsample(phantom_file, out, "--psnr-weights", fast_weights, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    written = set(json.loads((tmp_path / "o.json").read_text()))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("| keys | what they hold |", 1)[1].split("\n\n", 1)[0]
    documented = {
        name
        for row in table.splitlines()[2:]
        for name in re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", row.split(" | ")[0]))
    }
    assert documented == written


def test_the_sidecar_names_the_weights_by_absolute_path(
    tmp_path: Path, fast_weights: Path, phantom_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like its input and output: the sidecar may be read from anywhere."""
    monkeypatch.chdir(fast_weights.parent)
    out = tmp_path / "o.nii.gz"
    result = upsample(phantom_file, out, "--psnr-weights", fast_weights.name, *SMALL_PATCH)
    assert result.exit_code == 0, result.stderr
    (source,) = json.loads((tmp_path / "o.json").read_text())["weights"]
    assert source["path"] == str(fast_weights)
