"""`mrisr prepare`: layout, geometry, normalisation, split, skipping, reruns and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from mrisr_cli.cli import app
from mrisr_cli.degradation import DegradationConfig, degrade_volume
from mrisr_cli.errors import InputError, OutputError
from mrisr_cli.intensity import foreground_mask, foreground_stats
from mrisr_cli.manifest import load_manifest
from mrisr_cli.prepare import (
    PrepareOptions,
    SubjectOutcome,
    find_scans,
    freesurfer_mri_folders,
    prepare_dataset,
    prepare_subject,
    resample_isotropic,
    subject_of,
)
from mrisr_cli.splits import assign_splits, split_counts
from mrisr_cli.volumes import check_t1_name
from mrisr_cli.weights import sha256_of

SHAPE = (68, 66, 70)
NO_N4 = PrepareOptions(DegradationConfig(n4=False))
# tiny heads for the tests of reruns: a tenth of a second per subject
SMALL = (24, 22, 26)
SMALL_OPTIONS = PrepareOptions(NO_N4.degradation, min_extent_mm=16)
SMALL_ARGS = ("--no-n4", "--min-extent", "16", "--jobs", "1")


def head(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A smooth 'head': shells of different intensity, noisy, positive, uint8-like range."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / (np.array(shape)[:, None, None, None] / 2)) ** 2).sum(0))
    volume = np.select([radius < 0.4, radius < 0.7, radius < 0.9], [160.0, 100.0, 60.0], 0.0)
    volume = ndi.gaussian_filter(volume.astype(np.float32), 1.0)
    return np.clip(volume + rng.normal(0, 3, shape), 0, None).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def prepared_heads(root: Path, count: int, ratios: tuple[float, float, float, float]) -> Path:
    """``count`` synthetic heads in air (84x80x86) through `prepare_dataset` with the split
    ``ratios``, in ``root/prepared``; the small training set of the tool and script tests."""
    for k in range(count):
        volume = np.zeros((84, 80, 86), np.float32)
        volume[8:76, 7:73, 8:78] = head(k)
        save(root / "src" / f"sub-0{k + 1}_T1w.nii.gz", volume)
    options = PrepareOptions(NO_N4.degradation, ratios=ratios)
    prepare_dataset(root / "src", root / "prepared", options)
    return root / "prepared"


def small_heads(src: Path, seeds: range | list[int]) -> None:
    """Tiny distinct heads ``src/s<seed>.nii.gz`` (prepare with SMALL_OPTIONS / SMALL_ARGS)."""
    for seed in seeds:
        save(src / f"s{seed}.nii.gz", head(seed, SMALL))


def splits_of(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["id"]: s["split"] for s in manifest["subjects"]}


def invoke(*args: str | Path):
    result = CliRunner().invoke(app, ["prepare", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_layout_geometry_and_normalisation(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    plain = head(0)
    save(src / "sub-01_T1w.nii.gz", plain)
    # the same kind of head stored left-posterior-superior: prepare must give RAS+ axes
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    save(src / "sub-02_T1w.nii.gz", head(1), lps)
    # 1.2 mm voxels along axis 2: resampled to 1 mm with a cubic B-spline
    save(src / "sub-03_T1w.nii.gz", head(2), np.diag([1.0, 1.0, 1.2, 1.0]))
    manifest = prepare_dataset(src, out, NO_N4)
    subjects = {s["id"]: s for s in manifest["subjects"]}
    assert sorted(subjects) == ["sub-01_T1w", "sub-02_T1w", "sub-03_T1w"]
    assert manifest["counts"]["train"] >= 1 and manifest["counts"]["val"] == 1
    assert manifest["failures"] == []

    hr2 = np.load(out / subjects["sub-02_T1w"]["files"]["hr"]["path"], mmap_mode="r")
    assert hr2.dtype == np.float16 and isinstance(hr2, np.memmap)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(head(1), lps))
    np.testing.assert_allclose(
        np.asarray(subjects["sub-02_T1w"]["affine"]), canonical.affine, atol=1e-6
    )
    lr2 = np.load(out / "subjects/sub-02_T1w/lr.npy")
    # both volumes are z-scores with the *degraded* volume's foreground statistics
    stats = foreground_stats(np.asarray(canonical.dataobj, np.float32))
    assert stats.std > 0
    raw = np.asarray(canonical.dataobj, dtype=np.float32)
    lr_raw = degrade_volume(raw, NO_N4.degradation, affine=canonical.affine)
    lr_stats = foreground_stats(lr_raw, foreground_mask(lr_raw))
    np.testing.assert_allclose(hr2, lr_stats.normalise(raw), atol=1e-2)
    np.testing.assert_allclose(lr2, lr_stats.normalise(lr_raw), atol=1e-2)

    resampled = subjects["sub-03_T1w"]
    assert resampled["shape"] == [68, 66, 84]  # 70 x 1.2 mm = 84 mm
    zooms = np.sqrt((np.asarray(resampled["affine"])[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(zooms, 1.0)
    for record in subjects.values():
        for entry in record["files"].values():
            assert sha256_of(out / entry["path"]) == entry["sha256"]
        mask = np.load(out / record["files"]["mask"]["path"])
        centres = np.load(out / record["files"]["centres"]["path"])
        assert mask.dtype == np.uint8 and mask[tuple(centres.T)].all()
    loaded = load_manifest(out)
    assert loaded.degradation == NO_N4.degradation and len(loaded.split("train")) >= 1


def test_bad_files_are_reported_and_skipped_and_reruns_skip_done(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    save(src / "a" / "scan.nii.gz", head(0))
    save(src / "b" / "scan.nii.gz", head(3))  # same name in another folder: ids stay unique
    (src / "text.nii.gz").write_text("not an image")
    save(src / "labels.nii.gz", (head(1) > 90).astype(np.uint8) * 3)
    save(src / "fmri.nii.gz", np.stack([head(2)] * 3, axis=-1))
    save(src / "thick.nii.gz", head(4), np.diag([1.0, 1.0, 3.0, 1.0]))
    save(src / "slab.nii.gz", head(5, (68, 66, 20)))
    seen = []
    manifest = prepare_dataset(src, out, NO_N4, on_outcome=seen.append)
    assert sorted(s["id"] for s in manifest["subjects"]) == ["a_scan", "b_scan"]
    reasons = {Path(f["source"]).name: f["error"] for f in manifest["failures"]}
    assert "not a NIfTI" in reasons["text.nii.gz"]
    assert "label map" in reasons["labels.nii.gz"]
    assert "expected a 3D volume" in reasons["fmri.nii.gz"]
    assert "too coarse" in reasons["thick.nii.gz"]
    assert "too small" in reasons["slab.nii.gz"]
    assert sorted(o.status for o in seen) == ["done"] * 2 + ["failed"] * 5
    first = (out / "manifest.json").read_bytes()

    again: list = []
    prepare_dataset(src, out, NO_N4, on_outcome=again.append)
    assert sorted(o.status for o in again) == ["failed"] * 5 + ["skipped"] * 2
    assert (out / "manifest.json").read_bytes() == first  # deterministic

    # other settings would rebuild the dataset in place: refused, nothing touched
    cubic = PrepareOptions(DegradationConfig(n4=False, interpolation="cubic"))
    with pytest.raises(OutputError, match=r"--interpolation linear \(now --interpolation cubic\)"):
        prepare_dataset(src, out, cubic)
    assert (out / "manifest.json").read_bytes() == first


def test_empty_or_missing_source_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no NIfTI or MGH images"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", NO_N4)
    result = invoke(tmp_path / "empty", tmp_path / "out", "--no-n4")
    assert result.exit_code == 1
    assert result.output.strip().startswith("mrisr: error:")
    assert "no NIfTI or MGH images" in result.output
    assert "Traceback" not in result.output
    result = invoke(tmp_path / "missing", tmp_path / "out", "--no-n4")
    assert result.exit_code == 1 and "not a folder" in result.output


def test_only_bad_files_is_an_error(tmp_path: Path) -> None:
    save(tmp_path / "src" / "mask.nii.gz", (head(0) > 50).astype(np.uint8))
    with pytest.raises(InputError, match="none of the 1 images"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", NO_N4)


def test_cli_prepare_in_parallel_processes(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(2):
        save(src / f"sub-0{i}_T1w.nii.gz", head(i))
    save(src / "broken.nii", np.zeros(SHAPE, np.float32))
    result = invoke(src, out, "--no-n4", "--jobs", "2", "--split", "0.5,0.5,0,0", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "broken.nii" in result.output and "empty" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 1, "val": 1, "eval": 0, "test": 0}
    assert manifest["split"] == {"ratios": [0.5, 0.5, 0.0, 0.0], "seed": 3, "by": "subject"}
    summary = " ".join(result.output.split())
    assert "prepared 2 scans (2 new, 0 redone, 0 already done, 1 failed)" in summary


def test_bad_options(tmp_path: Path) -> None:
    save(tmp_path / "src" / "a.nii.gz", head(0))
    result = invoke(tmp_path / "src", tmp_path / "out", "--split", "0.7,0.3")
    assert result.exit_code == 1 and "--split takes four shares" in result.output
    result = invoke(tmp_path / "src", tmp_path / "out", "--interpolation", "nearest")
    assert result.exit_code == 1 and "interpolation must be one of" in result.output
    for split in ("0.7,0.1,0.1,nan", "0.7,inf,0,0"):  # refused before any scan is processed
        result = invoke(tmp_path / "src", tmp_path / "out", "--split", split, "--no-n4")
        assert result.exit_code == 1 and "--split takes four shares" in result.output
        assert not (tmp_path / "out" / "subjects").exists()


def test_split_counts_are_those_of_earlier_versions() -> None:
    """docs/training.md's rule, unchanged so that a new folder gets an earlier split again:
    round(share / sum x n) in floats (0.7+0.1+0.1+0.1 is 0.9999999999999999, so 5 x 0.1 / it
    rounds up where 5 x 1 / 10 = 0.5 rounds to even), val keeps one subject at share 0."""
    assert split_counts(5, (0.7, 0.1, 0.1, 0.1)) == (2, 1, 1, 1)
    assert split_counts(5, (7, 1, 1, 1)) == (4, 1, 0, 0)
    assert split_counts(25, (0.7, 0.1, 0.1, 0.1)) == (16, 3, 3, 3)
    assert split_counts(5, (1, 0, 0, 0)) == (4, 1, 0, 0)
    assert split_counts(16, (0.625, 0.125, 0, 0.25)) == (10, 2, 0, 4)  # the release's split
    assert split_counts(1113, (0.7, 0.1, 0.1, 0.1)) == (780, 111, 111, 111)  # the paper's


def test_a_subject_that_leaves_and_comes_back_gets_its_split_back(tmp_path: Path) -> None:
    """A scan missing for one run (moved, `datalad drop`, unreadable) is remembered in the
    manifest's "former" list; when it returns it is not split again (it could land in train)."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(8))
    prepare_dataset(src, out, SMALL_OPTIONS)
    before = splits_of(out)
    away = tmp_path / "away"
    away.mkdir()
    for name in ("s3", "s7"):
        (src / f"{name}.nii.gz").rename(away / f"{name}.nii.gz")
    prepare_dataset(src, out, SMALL_OPTIONS)
    raw = json.loads((out / "manifest.json").read_text())
    assert {r["id"]: r["split"] for r in raw["former"]} == {k: before[k] for k in ("s3", "s7")}
    small_heads(src, range(8, 12))
    for name in ("s3", "s7"):
        (away / f"{name}.nii.gz").rename(src / f"{name}.nii.gz")
    back = prepare_dataset(src, out, SMALL_OPTIONS)
    after = splits_of(out)
    assert {k: after[k] for k in before} == before
    assert back["run"]["assigned"] == 4
    assert "former" not in json.loads((out / "manifest.json").read_text())


def test_a_higher_min_extent_holds_scans_prepared_before_to_it(tmp_path: Path) -> None:
    """--min-extent is no setting that redoes a scan, but a rerun applies it to every scan: one
    prepared under a lower value leaves the dataset (remembered, in "former") until it is met."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(4))
    save(src / "slab.nii.gz", head(9, (SMALL[0], SMALL[1], 18)))  # 18 mm along its last axis
    first = prepare_dataset(src, out, SMALL_OPTIONS)
    assert first["min_extent_mm"] == 16 and len(first["subjects"]) == 5
    before = splits_of(out)
    stricter = PrepareOptions(SMALL_OPTIONS.degradation, min_extent_mm=20)
    second = prepare_dataset(src, out, stricter)
    assert second["min_extent_mm"] == 20
    assert sorted(splits_of(out)) == ["s0", "s1", "s2", "s3"]
    [failure] = second["failures"]
    assert failure["source"].endswith("slab.nii.gz")
    assert "field of view 24 x 22 x 18 mm is too small" in failure["error"]
    assert "at least 20 mm" in failure["error"]
    assert {r["id"]: r["split"] for r in second["former"]} == {"slab": before["slab"]}
    third = prepare_dataset(src, out, SMALL_OPTIONS)  # met again: back, with its split
    assert splits_of(out) == before and third["failures"] == []


def test_window_is_a_setting_of_the_dataset(tmp_path: Path) -> None:
    """--window reaches the manifest's degradation (which training copies into the weights),
    and a dataset of other windows is not extended: the refusal names the one option."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(2))
    assert invoke(src, out, *SMALL_ARGS, "--window", "1.5,1.25,1/2").exit_code == 0
    degradation = json.loads((out / "manifest.json").read_text())["degradation"]
    assert (degradation["unfilter_window"], degradation["filter_window"]) == (1.5, 1.25)
    assert degradation["window_power"] == 0.5
    before = (out / "manifest.json").read_bytes()
    result = invoke(src, out, *SMALL_ARGS)
    assert result.exit_code == 1
    assert "--window 1.5,1.25,0.5 (now --window 1.25,1.5,1/3)" in result.stderr
    assert (out / "manifest.json").read_bytes() == before
    # a value that prints like the recorded one but is not it: the difference still shows, and
    # what the message suggests reads back exactly
    result = invoke(src, out, *SMALL_ARGS, "--window", "1.5,1.25,0.5000001")
    assert result.exit_code == 1
    assert "--window 1.5,1.25,0.5 (now --window 1.5,1.25,0.5000001)" in result.stderr
    assert invoke(src, out, *SMALL_ARGS, "--window", "1.5,1.25,0.5").exit_code == 0


def test_other_contrasts_of_a_bids_tree_are_not_trained_on(tmp_path: Path) -> None:
    """A T2w or FLAIR header looks like a T1's: prepare of a BIDS tree took them in as
    training scans. Their BIDS names now fail them, each with its reason."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(3))
    save(src / "sub-07" / "anat" / "sub-07_FLAIR.nii.gz", head(7, SMALL))
    save(src / "sub-07" / "anat" / "sub-07_T2w.nii.gz", head(8, SMALL))
    save(src / "sub-07" / "anat" / "sub-07_T1w.nii.gz", head(9, SMALL))
    manifest = prepare_dataset(src, out, SMALL_OPTIONS)
    assert sorted(s["id"] for s in manifest["subjects"]) == ["s0", "s1", "s2", "sub-07_T1w"]
    reasons = {Path(f["source"]).name: f["error"] for f in manifest["failures"]}
    assert sorted(reasons) == ["sub-07_FLAIR.nii.gz", "sub-07_T2w.nii.gz"]
    assert "its name marks it as FLAIR, not as a T1-weighted scan" in str(reasons)
    for name in ("sub-01_t2w.nii", "T2w_acpc_dc_restore.nii.gz", "T2.mgz", "brain_mask.nii.gz"):
        with pytest.raises(InputError, match="its name marks it as"):
            check_t1_name(Path(name))
    for name in ("sub-01_desc-preproc_T1w.nii.gz", "T1w_acpc_dc_restore.nii.gz", "PD_012_T1.nii"):
        check_t1_name(Path(name))  # T1s, also a Parkinson's cohort's
    check_t1_name(Path("P012_t2.nii.gz"))  # a second time point of a longitudinal study


def test_a_deleted_manifest_loses_no_split(tmp_path: Path) -> None:
    """With manifest.json deleted (to "redo" it) but subjects/ kept, a rerun took the folder for
    an interrupted run and split afresh: 10 of 12 subjects moved. Each subject.json now recalls
    its split, also for a damaged subject that is prepared again."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(12))
    prepare_dataset(src, out, SMALL_OPTIONS)
    before = splits_of(out)
    assert len(set(before.values())) > 1
    (out / "manifest.json").unlink()
    (out / "subjects" / "s4" / "lr.npy").write_bytes(b"truncated")
    small_heads(src, [12])
    other_seed = PrepareOptions(SMALL_OPTIONS.degradation, seed=7, min_extent_mm=16)
    with pytest.raises(OutputError, match=r"was split with --split 0\.7,0\.1,0\.1,0\.1 --seed 0"):
        prepare_dataset(src, out, other_seed)  # subject.json recalls the rule, too
    again = prepare_dataset(src, out, SMALL_OPTIONS)
    after = splits_of(out)
    assert {k: after[k] for k in before} == before
    assert again["run"]["kept"] == 12 and again["run"]["assigned"] == 1
    recorded = json.loads((out / "subjects" / "s12" / "subject.json").read_text())
    assert recorded["split"] == after["s12"]


def test_new_subjects_fill_the_splits_around_the_kept_ones() -> None:
    subjects = [f"sub-{i:03d}" for i in range(40)]
    first = assign_splits(subjects, (0.7, 0.1, 0.1, 0.1), seed=1)
    kept = {name: list(first.values()).count(name) for name in ("train", "val", "eval", "test")}
    more = [f"sub-{i:03d}" for i in range(40, 50)]
    added = assign_splits(more, (0.7, 0.1, 0.1, 0.1), seed=1, kept=kept)
    assert sorted(added) == more
    total = [kept[n] + list(added.values()).count(n) for n in ("train", "val", "eval", "test")]
    assert tuple(total) == split_counts(50, (0.7, 0.1, 0.1, 0.1))  # (35, 5, 5, 5)
    # none kept: the fresh split, unchanged
    assert assign_splits(subjects, (0.7, 0.1, 0.1, 0.1), seed=1, kept={}) == first


def test_split_is_by_subject_deterministic_and_the_papers_ratio() -> None:
    assert split_counts(1113, (0.7, 0.1, 0.1, 0.1)) == (780, 111, 111, 111)
    assert split_counts(2, (0.7, 0.1, 0.1, 0.1)) == (1, 1, 0, 0)
    assert split_counts(1, (0.7, 0.1, 0.1, 0.1)) == (1, 0, 0, 0)
    subjects = [f"sub-{i:03d}" for i in range(40)]
    one = assign_splits(subjects, (0.7, 0.1, 0.1, 0.1), seed=1)
    assert one == assign_splits(list(reversed(subjects)), (0.7, 0.1, 0.1, 0.1), seed=1)
    assert one != assign_splits(subjects, (0.7, 0.1, 0.1, 0.1), seed=2)
    assert sorted(one.values()).count("train") == 28


def test_scans_with_the_same_name_get_distinct_ids(tmp_path: Path) -> None:
    """x.nii.gz beside x.mgz, names that differ only in characters ids cannot hold, and the
    same name in two folders: each scan keeps its own folder and manifest entry."""
    src = tmp_path / "src"
    save(src / "sub-02_T1w.nii.gz", head(0))
    nib.save(nib.MGHImage(head(1), np.eye(4)), str(src / "sub-02_T1w.mgz"))
    save(src / "a b.nii.gz", head(2))
    save(src / "a_b.nii.gz", head(3))
    save(src / "site1" / "scan.nii.gz", head(4))
    save(src / "site2" / "scan.nii.gz", head(5))
    manifest = prepare_dataset(src, tmp_path / "out", NO_N4)
    ids = sorted(r["id"] for r in manifest["subjects"])
    assert ids == ["a_b", "a_b-2", "site1_scan", "site2_scan", "sub-02_T1w", "sub-02_T1w-2"]
    for record in manifest["subjects"]:  # every file on disk is the one its entry describes
        hr = tmp_path / "out" / "subjects" / record["id"] / "hr.npy"
        assert sha256_of(hr) == record["files"]["hr"]["sha256"]
    again = prepare_dataset(src, tmp_path / "out", NO_N4)  # a rerun finds them all done
    assert sorted(r["id"] for r in again["subjects"]) == ids


def test_sessions_of_one_subject_share_a_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for subject in range(4):
        for session in (1, 2):
            save(src / f"sub-{subject}_ses-{session}_T1w.nii.gz", head(subject + 10 * session))
    manifest = prepare_dataset(src, tmp_path / "out", NO_N4)
    split_of: dict[str, set[str]] = {}
    for record in manifest["subjects"]:
        split_of.setdefault(record["subject"], set()).add(record["split"])
    assert len(split_of) == 4 and all(len(s) == 1 for s in split_of.values())


def test_one_freesurfer_subjects_volumes_share_a_split(tmp_path: Path) -> None:
    """SUBJECTS_DIR/bert/mri/{T1,nu,orig/001}.mgz are one person: each was its own subject, so
    bert's nu.mgz could train a model that is then tested on bert's T1.mgz."""
    src = tmp_path / "src"
    for number, name in enumerate(("bert", "ernie", "fred", "gus", "hal")):
        for kind, path in enumerate(("mri/T1.mgz", "mri/nu.mgz", "mri/orig/001.mgz")):
            volume = nib.MGHImage(head(10 * number + kind, SMALL).astype(np.float32), np.eye(4))
            (src / name / path).parent.mkdir(parents=True, exist_ok=True)
            nib.save(volume, src / name / path)
    manifest = prepare_dataset(src, tmp_path / "out", SMALL_OPTIONS)
    split_of: dict[str, set[str]] = {}
    for record in manifest["subjects"]:
        split_of.setdefault(record["subject"], set()).add(record["split"])
    assert sorted(split_of) == ["bert", "ernie", "fred", "gus", "hal"]
    assert all(len(s) == 1 for s in split_of.values()) and len(manifest["subjects"]) == 15
    freesurfer = freesurfer_mri_folders([Path("site/bert/mri/T1.mgz"), Path("data/mri/a.mgz")])
    assert freesurfer == {Path("site/bert/mri")}
    assert subject_of(Path("site/bert/mri/orig/001.mgz"), freesurfer) == "site/bert"
    assert subject_of(Path("site/bert/mri/T1.nii.gz"), freesurfer) == "site/bert"  # exported
    assert subject_of(Path("data/mri/a.mgz"), freesurfer) is None  # no FreeSurfer volume there
    assert subject_of(Path("sub-07/ses-1/anat/T1w.nii.gz")) == "sub-07"
    assert subject_of(Path("S01_t1.nii.gz")) is None
    assert subject_of(Path("IXI/mri/IXI002-Guys-0828-T1.nii.gz")) is None  # not FreeSurfer's


def test_a_dataset_prepared_before_the_grouping_is_regrouped_and_warned_about(
    tmp_path: Path,
) -> None:
    """Scans done by an earlier version carry its subject (the scan itself): a rerun groups them
    by their path as new scans are, and names one person's scans that sit in several splits."""
    src, out = tmp_path / "src", tmp_path / "out"
    for number, name in enumerate(("bert", "ernie", "fred", "gus")):
        for kind, path in enumerate(("mri/T1.mgz", "mri/nu.mgz")):
            volume = nib.MGHImage(head(10 * number + kind, SMALL).astype(np.float32), np.eye(4))
            (src / name / path).parent.mkdir(parents=True, exist_ok=True)
            nib.save(volume, src / name / path)
    prepare_dataset(src, out, SMALL_OPTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    for record in manifest["subjects"]:  # as the earlier version wrote them
        record["subject"] = record["id"]
        record["split"] = "test" if record["id"] == "bert_mri_nu" else "train"
        own = out / "subjects" / record["id"] / "subject.json"
        own.write_text(json.dumps({**json.loads(own.read_text()), "subject": record["id"]}))
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = prepare_dataset(src, out, SMALL_OPTIONS)
    bert = {r["id"]: r for r in again["subjects"] if r["id"].startswith("bert")}
    assert {r["subject"] for r in bert.values()} == {"bert"}
    assert {r["split"] for r in bert.values()} == {"train", "test"}  # kept, and named:
    assert any("different splits (train, test)" in w for w in again["run"]["warnings"])


def test_resample_isotropic_keeps_voxel_zero_and_the_signal() -> None:
    data = head(0, (40, 44, 30))
    affine = np.array([[1.0, 0, 0, -20], [0, 1.0, 0, -22], [0, 0, 1.5, -22], [0, 0, 0, 1]])
    out, new_affine = resample_isotropic(data, affine, 1.0)
    assert out.shape == (40, 44, 45)
    np.testing.assert_allclose(new_affine[:3, 3], affine[:3, 3])
    np.testing.assert_allclose(np.diag(new_affine)[:3], [1.0, 1.0, 1.0])
    # every second output slice along the resampled axis sits on an input slice (1.5 mm = 3/2)
    np.testing.assert_allclose(out[..., 0:45:3], data[..., 0:30:2], atol=2.0)
    same, same_affine = resample_isotropic(data, np.eye(4), 1.0)
    assert same is data and np.array_equal(same_affine, np.eye(4))


@pytest.mark.slow
def test_n4_runs_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    bias = np.linspace(0.8, 1.2, SHAPE[0], dtype=np.float32)[:, None, None]
    save(src / "sub-01_T1w.nii.gz", head(0) * bias)
    manifest = prepare_dataset(src, tmp_path / "out", PrepareOptions(DegradationConfig(n4=True)))
    assert manifest["n4"] is True and manifest["degradation"]["n4"] is True
    subject = manifest["subjects"][0]
    hr = np.load(tmp_path / "out" / subject["files"]["hr"]["path"]).astype(np.float32)
    assert np.isfinite(hr).all()
    # the stored target is N4-corrected: the 0.8 -> 1.2 ramp along x is gone
    hr = hr * subject["intensity"]["std"] + subject["intensity"]["mean"]
    mask = foreground_mask(hr)
    half = SHAPE[0] // 2

    def ramp(volume: np.ndarray) -> float:
        """Mean foreground intensity of the upper half along x over that of the lower half."""
        return float(volume[half:][mask[half:]].mean() / volume[:half][mask[:half]].mean())

    assert ramp(head(0) * bias) > 1.1  # 1.13: what the stored target shows without N4
    assert abs(ramp(hr) - 1.0) < 0.04  # 1.01 here


def test_extending_a_dataset_keeps_every_split(tmp_path: Path) -> None:
    """8 -> 9 scans moved subjects test->val, val->eval, eval->test: a test subject could then
    end in train after a model was trained. Now only the new one is assigned."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(8))
    first = prepare_dataset(src, out, SMALL_OPTIONS)
    before = splits_of(out)
    small_heads(src, [8])
    again = prepare_dataset(src, out, SMALL_OPTIONS)
    after = splits_of(out)
    assert {k: after[k] for k in before} == before and "s8" in after
    assert first["run"] == {"kept": 0, "assigned": 8, "warnings": []}
    assert again["run"] == {"kept": 8, "assigned": 1, "warnings": []}
    assert again["counts"] == dict(
        zip(("train", "val", "eval", "test"), split_counts(9, (7, 1, 1, 1)), strict=True)
    )
    written = (out / "manifest.json").read_bytes()
    assert "run" not in json.loads(written)  # a rerun writes the same file
    prepare_dataset(src, out, SMALL_OPTIONS)
    assert (out / "manifest.json").read_bytes() == written

    # the CLI says what was kept and what newly assigned
    small_heads(src, [9])
    result = invoke(src, out, *SMALL_ARGS)
    assert result.exit_code == 0, result.output
    summary = " ".join(result.output.split())
    assert "(1 new, 0 redone, 9 already done, 0 failed)" in summary
    assert "9 kept their split, 1 newly assigned" in summary
    (src / "s9.nii.gz").unlink()
    prepare_dataset(src, out, SMALL_OPTIONS)
    written = (out / "manifest.json").read_bytes()

    # another --seed or --split would re-split: refused on one line, nothing changed
    for extra in (("--seed", "1"), ("--split", "0.6,0.2,0.1,0.1")):
        result = invoke(src, out, *SMALL_ARGS, *extra)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mrisr: error:")
        assert "--split 0.7,0.1,0.1,0.1 --seed 0" in lines[0] and "another rule" in lines[0]
        assert (out / "manifest.json").read_bytes() == written


def test_out_must_be_new_empty_or_the_same_dataset(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(2))
    assert invoke(src, out, *SMALL_ARGS).exit_code == 0
    manifest = (out / "manifest.json").read_bytes()
    hr = sha256_of(out / "subjects" / "s0" / "hr.npy")

    def refused(target: Path, *args: str) -> str:
        result = invoke(src, target, *SMALL_ARGS, *args)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mrisr: error:"), result.output
        assert "Traceback" not in result.output and "OUT folder" in lines[0]
        return lines[0]

    # another --factor would re-prepare everything in place
    assert "--factor 2 (now --factor 3)" in refused(out, "--factor", "3")
    assert (out / "manifest.json").read_bytes() == manifest
    assert sha256_of(out / "subjects" / "s0" / "hr.npy") == hr
    # a folder that is not an mrisr dataset: its manifest.json is not overwritten
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"x": 1}\n')
    assert "not an mrisr dataset" in refused(foreign)
    assert (foreign / "manifest.json").read_text() == '{"x": 1}\n'
    assert not (foreign / "subjects").exists()
    (foreign / "manifest.json").unlink()
    (foreign / "notes.txt").write_text("mine")
    assert "not empty" in refused(foreign)
    # OUT == SRC or inside it, and a file
    assert "source folder" in refused(src)
    assert "source folder" in refused(src / "prepared")
    assert sorted(p.name for p in src.iterdir()) == ["s0.nii.gz", "s1.nii.gz"]
    (tmp_path / "file").write_text("")
    assert "not a folder" in refused(tmp_path / "file")
    # a run interrupted before its manifest resumes with the same settings, not with others
    (out / "manifest.json").unlink()
    assert "--factor 2 (now --factor 3)" in refused(out, "--factor", "3")
    result = invoke(src, out, *SMALL_ARGS)
    assert result.exit_code == 0 and "0 new, 0 redone, 2 already done" in " ".join(
        result.output.split()
    )
    # a new folder and an empty one are fine
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert invoke(src, target, *SMALL_ARGS).exit_code == 0


def test_identical_files_share_a_split_and_are_named(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(3))
    (src / "copy_of_s0.nii.gz").write_bytes((src / "s0.nii.gz").read_bytes())
    options = PrepareOptions(SMALL_OPTIONS.degradation, (0.5, 0.5, 0, 0), 0, 16)
    first = prepare_dataset(src, out, options)
    splits = splits_of(out)
    assert splits["s0"] == splits["copy_of_s0"]
    assert [splits[k] for k in ("s0", "s1", "s2")].count("val") == 2  # 3 groups: 1.5 rounds up
    (warning,) = first["run"]["warnings"]
    assert "copy_of_s0.nii.gz" in warning and "s0.nii.gz" in warning and "identical" in warning
    shown = invoke(src, tmp_path / "out2", "--split", "0.5,0.5,0,0", *SMALL_ARGS)
    assert shown.exit_code == 0, shown.output
    assert f"mrisr: warning: {' '.join(warning.split())}" in " ".join(shown.output.split())

    # a copy added later joins its original's split
    (src / "later_s1.nii.gz").write_bytes((src / "s1.nii.gz").read_bytes())
    second = prepare_dataset(src, out, options)
    assert splits_of(out)["later_s1"] == splits["s1"]
    assert second["run"]["kept"] == 5 and second["run"]["assigned"] == 0

    # copies that an earlier version put in different splits keep them, and are named
    raw = json.loads((out / "manifest.json").read_text())
    for record in raw["subjects"]:
        if record["id"] in ("s0", "copy_of_s0"):
            record["split"] = "train" if record["id"] == "s0" else "test"
    (out / "manifest.json").write_text(json.dumps(raw))
    third = prepare_dataset(src, out, options)
    assert splits_of(out)["s0"] == "train" and splits_of(out)["copy_of_s0"] == "test"
    assert any("different splits (train, test)" in w for w in third["run"]["warnings"])


def test_a_hand_edited_manifest_is_refused_until_prepared_again(tmp_path: Path) -> None:
    """A factor edited 2 -> 3 gave weights that said 3 for data degraded by 2, and a split
    edited gave a resumed run another validation set: the stored fingerprint no longer
    matched, but nothing recomputed it. A rerun of `prepare` writes a fingerprint that does."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(3))
    prepare_dataset(src, out, SMALL_OPTIONS)
    pristine = (out / "manifest.json").read_text()
    assert load_manifest(out).degradation.factor == 2
    raw = json.loads(pristine)
    raw["degradation"]["factor"] = 3
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="does not match its fingerprint") as caught:
        load_manifest(out)
    assert "\n" not in str(caught.value) and "mrisr prepare" in str(caught.value)

    raw = json.loads(pristine)  # a val subject moved to test, as the audit did
    for record in raw["subjects"]:
        record["split"] = "test" if record["split"] == "val" else record["split"]
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="does not match its fingerprint"):
        load_manifest(out)
    assert prepare_dataset(src, out, SMALL_OPTIONS)["run"]["kept"] == 3  # keeps the edit
    assert not load_manifest(out).split("val") and load_manifest(out).split("test")

    # what the fingerprint leaves out (the counts) and the key order are not edits of it
    raw = json.loads(pristine)
    raw["counts"] = {}
    raw["degradation"] = dict(reversed(raw["degradation"].items()))
    (out / "manifest.json").write_text(json.dumps(dict(reversed(raw.items()))))
    assert load_manifest(out).fingerprint == raw["fingerprint"]


def test_damaged_subjects_are_redone_and_named(tmp_path: Path) -> None:
    """`train` refuses a truncated hr.npy; prepare used to count it as done (files existed)."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(3))
    prepare_dataset(src, out, SMALL_OPTIONS)
    with (out / "subjects" / "s0" / "hr.npy").open("r+b") as handle:
        handle.truncate(1000)
    np.save(out / "subjects" / "s1" / "mask.npy", np.zeros(SMALL, np.float32))  # wrong dtype
    seen: list[SubjectOutcome] = []
    manifest = prepare_dataset(src, out, SMALL_OPTIONS, on_outcome=seen.append)
    status = {o.scan.id: (o.status, o.message) for o in seen}
    assert status["s0"] == ("done", "redone: subjects/s0/hr.npy was missing or unreadable")
    assert status["s1"][0] == "done" and "mask.npy held float32" in status["s1"][1]
    assert status["s2"] == ("skipped", "already prepared")
    redone = [w for w in manifest["run"]["warnings"] if "prepared it again" in w]
    assert len(redone) == 2  # besides them: eval and test are empty with 3 subjects
    for record in load_manifest(out).subjects:  # what training opens
        for entry in record["files"].values():
            assert np.load(out / entry["path"], mmap_mode="r").size > 0
            assert sha256_of(out / entry["path"]) == entry["sha256"]


def test_damage_that_keeps_the_size_is_found_by_the_recorded_sha256(tmp_path: Path) -> None:
    """Zeroed bytes at the end of lr.npy left its header and size intact: a rerun counted the
    subject as done although its file no longer matched the sha256 in its own subject.json."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(3))
    prepare_dataset(src, out, SMALL_OPTIONS)
    lr = out / "subjects" / "s1" / "lr.npy"
    data = bytearray(lr.read_bytes())
    data[-4000:] = bytes(4000)
    lr.write_bytes(bytes(data))
    seen: list[SubjectOutcome] = []
    manifest = prepare_dataset(src, out, SMALL_OPTIONS, on_outcome=seen.append)
    status = {o.scan.id: (o.status, o.message) for o in seen}
    assert status["s1"][0] == "done", status
    assert "subjects/s1/lr.npy did not match the sha256" in status["s1"][1]
    assert status["s0"] == status["s2"] == ("skipped", "already prepared")
    assert any("lr.npy did not match" in w for w in manifest["run"]["warnings"])
    for record in manifest["subjects"]:
        for entry in record["files"].values():
            assert sha256_of(out / entry["path"]) == entry["sha256"]
    # a record without hashes (as an older version might have written): the header check only
    own = out / "subjects" / "s2" / "subject.json"
    record = json.loads(own.read_text())
    record["files"] = {name: {"path": entry["path"]} for name, entry in record["files"].items()}
    own.write_text(json.dumps(record))
    (scan,) = [s for s in find_scans(src) if s.id == "s2"]
    assert prepare_subject(scan, out, SMALL_OPTIONS).status == "skipped"


def test_a_copy_in_another_encoding_shares_a_split(tmp_path: Path) -> None:
    """s0.nii.gz and s0_again.nii hold the same voxels in other bytes: grouped by file sha256
    alone, they could land in test and train. A dataset that an earlier version split so keeps
    its splits on a rerun, and the two are named (their hr.npy is the same)."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(3))
    save(src / "s0_again.nii", head(0, SMALL))  # uncompressed: other bytes, same voxels
    nib.save(nib.MGHImage(head(1, SMALL), np.eye(4)), str(src / "s1_again.mgz"))
    assert sha256_of(src / "s0.nii.gz") != sha256_of(src / "s0_again.nii")
    # seed 3: grouped by file alone, both pairs were split (s0 val, s0_again train)
    options = PrepareOptions(SMALL_OPTIONS.degradation, (0.5, 0.5, 0, 0), 3, 16)
    first = prepare_dataset(src, out, options)
    splits = splits_of(out)
    assert splits["s0"] == splits["s0_again"] and splits["s1"] == splits["s1_again"]
    assert [splits[k] for k in ("s0", "s1", "s2")].count("val") == 2  # 3 groups: 1.5 rounds up
    named = [w for w in first["run"]["warnings"] if "identical" in w]
    assert len(named) == 2 and any("s0_again.nii" in w and "s0.nii.gz" in w for w in named)

    # as an earlier version wrote it: no voxels_sha256, and the copies in two splits
    raw = json.loads((out / "manifest.json").read_text())
    for record in raw["subjects"]:
        record.pop("voxels_sha256")
        if record["id"] in ("s0", "s0_again"):
            record["split"] = "train" if record["id"] == "s0" else "test"
        own = out / "subjects" / record["id"] / "subject.json"
        on_disk = json.loads(own.read_text())
        on_disk.pop("voxels_sha256")
        own.write_text(json.dumps({**on_disk, "split": record["split"]}))
    (out / "manifest.json").write_text(json.dumps(raw))
    again = prepare_dataset(src, out, options)
    assert splits_of(out)["s0"] == "train" and splits_of(out)["s0_again"] == "test"
    (warning,) = [w for w in again["run"]["warnings"] if "different splits" in w]
    assert "s0_again.nii" in warning and "(train, test)" in warning

    # the same voxels under a header that says 1.1 mm: resampled, its hr.npy differs
    other = tmp_path / "other"
    save(other / "s0.nii.gz", head(0, SMALL))
    save(other / "s0_relabelled.nii.gz", head(0, SMALL), np.diag([1.0, 1.0, 1.1, 1.0]))
    manifest = prepare_dataset(other, tmp_path / "out_other", SMALL_OPTIONS)
    hr = {r["id"]: r["files"]["hr"]["sha256"] for r in manifest["subjects"]}
    assert hr["s0"] != hr["s0_relabelled"]
    assert len(set(splits_of(tmp_path / "out_other").values())) == 1
    assert any("identical" in w for w in manifest["run"]["warnings"])


def test_an_empty_val_or_test_is_warned_about_at_prepare_time(tmp_path: Path) -> None:
    """One scan gave "train 1, val 0, eval 0, test 0" without a word; only `mrisr train` said
    later that it had nothing to validate on (and so writes no best weights)."""
    src = tmp_path / "src"
    small_heads(src, [0])
    result = invoke(src, tmp_path / "one", *SMALL_ARGS)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert "mrisr: warning: val is empty (1 subject in all; eval and test empty too)" in shown
    assert "no best weights" in shown
    manifest = prepare_dataset(src, tmp_path / "one", SMALL_OPTIONS)  # a rerun says it again
    assert manifest["counts"] == {"train": 1, "val": 0, "eval": 0, "test": 0}
    assert [w for w in manifest["run"]["warnings"] if w.startswith("val is empty")]
    # two subjects: val gets one, test none although its share asked for scans
    small_heads(src, [1])
    two = prepare_dataset(src, tmp_path / "two", SMALL_OPTIONS)
    assert two["counts"] == {"train": 1, "val": 1, "eval": 0, "test": 0}
    (warning,) = two["run"]["warnings"]
    assert warning.startswith("eval and test are empty (2 subjects in all")
    # shares of 0 ask for no eval or test scans: nothing to warn about
    zero = PrepareOptions(SMALL_OPTIONS.degradation, (0.5, 0.5, 0, 0), 0, 16)
    assert prepare_dataset(src, tmp_path / "zero", zero)["run"]["warnings"] == []


def test_a_run_that_prepares_nothing_leaves_no_empty_folders(tmp_path: Path) -> None:
    save(tmp_path / "src" / "mask.nii.gz", (head(0) > 50).astype(np.uint8))
    for out in (tmp_path / "out", tmp_path / "new" / "deeper"):
        with pytest.raises(InputError, match="none of the 1 images"):
            prepare_dataset(tmp_path / "src", out, NO_N4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (tmp_path / "empty").mkdir()  # OUT made by the user: kept, only subjects/ goes
    result = invoke(tmp_path / "src", tmp_path / "empty", "--no-n4", "--jobs", "1")
    assert result.exit_code == 1 and "none of the 1 images" in result.output
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_run_stopped_before_any_subject_leaves_no_empty_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mrisr_cli.prepare as prepare_module

    def ctrl_c(*args: object) -> None:
        raise KeyboardInterrupt

    small_heads(tmp_path / "src", range(1))
    monkeypatch.setattr(prepare_module, "prepare_subject", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tmp_path / "src", tmp_path / "new" / "out", SMALL_OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_moved_source_folder_is_named_where_it_is_now(tmp_path: Path) -> None:
    """Scans skipped as already prepared kept the path they had: after the source folder
    moved, the identical-files warning named old paths next to new ones."""
    src, out = tmp_path / "src", tmp_path / "out"
    small_heads(src, range(2))
    (src / "copy_of_s0.nii.gz").write_bytes((src / "s0.nii.gz").read_bytes())
    prepare_dataset(src, out, SMALL_OPTIONS)
    moved = src.rename(tmp_path / "moved")
    seen: list[SubjectOutcome] = []
    manifest = prepare_dataset(moved, out, SMALL_OPTIONS, on_outcome=seen.append)
    assert {o.status for o in seen} == {"skipped"}
    (warning,) = [w for w in manifest["run"]["warnings"] if "identical" in w]
    assert str(moved / "s0.nii.gz") in warning and str(src) + "/" not in warning
    for record in manifest["subjects"]:
        assert Path(record["source"]).parent == moved
        own = json.loads((out / "subjects" / record["id"] / "subject.json").read_text())
        assert own["source"] == record["source"]


@pytest.mark.slow
def test_sigterm_during_n4_with_one_job_stops_at_once(tmp_path: Path) -> None:
    """With --jobs 1, N4 ran in prepare's own process, deaf to signals for its minutes on a whole
    head: a SLURM time limit's SIGTERM waited for it. It now runs in a child process."""
    import sys

    # here, not at the top: tests/test_n4.py imports this module in a fresh interpreter
    from conftest import n4_stop_script, sigterm_once_started

    save(tmp_path / "src" / "sub-01_T1w.nii.gz", head(0))
    out, started = tmp_path / "out", tmp_path / "started"
    command = [
        *(sys.executable, "-c", n4_stop_script("n4", "n4_correct"), str(started), "prepare"),
        *(str(tmp_path / "src"), str(out), "--jobs", "1", "--threads", "1"),
    ]
    sigterm_once_started(command, started)
    assert not list(out.rglob("*.npy")), "no subject half-written"
