"""`mrisr evaluate` end to end on tiny synthetic NIfTI folders, pairing, statistics, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
import typing
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import n4_stop_script, sigterm_once_started
from scipy import ndimage as ndi
from typer.testing import CliRunner

from mrisr_cli import cli_evaluate
from mrisr_cli import evaluation as evaluation_module
from mrisr_cli.cli import app
from mrisr_cli.evaluation import reference_mask
from mrisr_cli.evaluation_results import METRIC_BY_KEY, PairResult
from mrisr_cli.evaluation_stats import paired_tests, summarise
from mrisr_cli.networks.highres3dnet import RECEPTIVE_RADIUS, HighRes3DNet
from mrisr_cli.pairing import match_files, name_score
from mrisr_cli.workers import WorkerPool

SHAPE = (22, 24, 20)
AFFINE = np.array(
    [[-1.0, 0, 0, 90], [0, 1.0, 0, -120], [0, 0, 1.0, -70], [0, 0, 0, 1]], dtype=np.float64
)
FAST = ["--no-n4"]


def head(seed: int) -> np.ndarray:
    """A small 'brain': three intensity shells, smooth, slightly noisy, positive."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE).astype(np.float32)
    centre = (np.array(SHAPE, dtype=np.float32) - 1)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(axis=0)) / (min(SHAPE) / 2)
    radius = radius * (1 + 0.05 * seed)
    volume = np.select([radius < 0.35, radius < 0.65, radius < 0.9], [60.0, 150.0, 100.0], 0.0)
    volume = ndi.gaussian_filter(volume.astype(np.float32), 0.8)
    return (volume + rng.normal(0, 1.5, SHAPE)).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def dataset(root: Path, subjects: int = 3) -> tuple[Path, Path, Path]:
    """hr/ with BIDS names; sharp/ (mild blur, BIDS desc- names) and blurry/ (strong blur)."""
    hr, sharp, blurry = root / "hr", root / "sharp", root / "blurry"
    for i in range(subjects):
        ref = head(i)
        save(hr / f"sub-0{i}_T1w.nii.gz", ref)
        save(sharp / f"sub-0{i}_desc-sr_T1w.nii.gz", ndi.gaussian_filter(ref, 0.6))
        save(blurry / f"sub-0{i}_T1w.nii", ndi.gaussian_filter(ref, 1.4))
    return hr, sharp, blurry


def invoke(*args: str | Path):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# --- end to end -------------------------------------------------------------------------------


def test_one_method_table_and_report(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path)
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", sharp, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "SSIM" in result.stdout and "PSNR" in result.stdout and "sharp" in result.stdout
    assert "M_h" not in result.stdout  # no weights: the columns are absent ...
    # one method: no paired test, so neither the title nor a row mentions one
    assert "t-test" not in result.stdout and "p-value" not in result.stdout
    assert "better" not in result.stdout
    rows = read_rows(out / "subjects.csv")
    assert [r["subject"] for r in rows] == ["sub-00_T1w", "sub-01_T1w", "sub-02_T1w"]
    assert all(r["error"] == "" for r in rows)
    assert "mh" not in rows[0] and "tissue_dice" in rows[0]
    for r in rows:
        assert 0.9 < float(r["ssim"]) < 1 and float(r["psnr"]) > 25 and 0 < float(r["nrmse"]) < 0.2
        assert 0.5 < float(r["tissue_dice"]) <= 1
        # the texture metrics, next to the image metrics: a blurred copy has less fine detail
        assert 0 < float(r["hf_power"]) < 0.6 and 0.8 < float(r["hf_corr"]) < 1
    assert list(rows[0])[4:12] == [
        *("ssim", "psnr", "nrmse", "ssim_mask", "psnr_mask", "nrmse_mask"),
        *("hf_power", "hf_corr"),
    ]
    assert "HF power →1" in result.stdout and "HF corr ↑" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    listed = {m["key"]: m for m in summary["metrics"]}
    assert listed["hf_power"]["higher_is_better"] is None and listed["hf_power"]["ideal"] == 1.0
    assert listed["hf_corr"]["higher_is_better"] is True and listed["hf_corr"]["ideal"] is None
    hf = summary["methods"]["sharp"]["metrics"]["hf_power"]
    assert hf["n"] == 3
    assert hf["mean"] == pytest.approx(np.mean([float(r["hf_power"]) for r in rows]))
    assert "cycles/voxel" in summary["settings"]["high_frequency"]
    assert "min-max of the reference" in summary["settings"]["normalisation"]
    assert "K1=0.01, K2=0.03" in summary["settings"]["ssim"]
    assert any("no --parcellation-weights" in n for n in summary["notes"])  # ... and why
    stats = summary["methods"]["sharp"]["metrics"]["psnr"]
    values = [float(r["psnr"]) for r in rows]
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["comparison"] is None and summary["settings"]["test"] is None
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["boxplots.png", *(f"slices_sub-0{i}_T1w.png" for i in range(3))]
    assert (out / "figures" / "boxplots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_context_help_names_the_receptive_radius() -> None:
    """The help's exact value is a literal (the CLI does not import torch): keep it in step."""
    hints = typing.get_type_hints(cli_evaluate.evaluate_command, include_extras=True)
    help_text = hints["parcellation_context"].__metadata__[0].help
    assert f": {RECEPTIVE_RADIUS}, its receptive radius" in help_text


def test_the_folders_are_listed_and_paired_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI checks the inputs before its progress bar, then runs that same plan."""
    hr, sharp, blurry = dataset(tmp_path, subjects=2)
    calls: list[Path] = []
    planner = evaluation_module.plan

    def counting_plan(ref_dir: Path, *args: Any) -> Any:
        calls.append(ref_dir)
        return planner(ref_dir, *args)

    monkeypatch.setattr(evaluation_module, "plan", counting_plan)
    result = invoke("--ref", hr, "--pred", sharp, "--pred", blurry, *FAST)
    assert result.exit_code == 0, result.output
    assert calls == [hr]


def test_two_methods_paired_test_prefers_the_sharper(tmp_path: Path) -> None:
    hr, sharp, blurry = dataset(tmp_path, subjects=4)
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", sharp, "--pred", blurry, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "p-value" in result.stdout and "better" in result.stdout
    assert "paired two-tailed t-test" in result.stdout and "where p < 0.05" in result.stdout
    # the label, n, the six image metrics, the two texture metrics (tissue Dice follows): HF
    # power has no better direction (1 is ideal), so a significant difference only 'differs'
    assert _table_row(result.stdout, "better")[2:10] == ["sharp"] * 6 + ["differ", "sharp"]
    assert "differ: significant, no better direction" in " ".join(result.stdout.split())
    summary = json.loads((out / "summary.json").read_text())
    comparison = summary["comparison"]
    assert comparison["first"] == "sharp" and comparison["second"] == "blurry"
    assert comparison["significance_level"] == 0.05
    assert "p < 0.05" in summary["settings"]["test"]
    for key in ("ssim", "psnr", "nrmse", "ssim_mask", "psnr_mask", "nrmse_mask", "hf_corr"):
        test = comparison["metrics"][key]
        assert test["n"] == 4 and test["better"] == "sharp", key
        # hf_corr: measured inside the face-cleared mask of these small volumes, p 0.012
        assert 0 <= test["p"] < (0.05 if key == "hf_corr" else 0.01), key
        assert test["significant"] is True, key
    power = comparison["metrics"]["hf_power"]
    assert power["significant"] is True and power["better"] is None
    assert power["mean_difference"] > 0  # the blurrier copy has less fine detail
    assert len(read_rows(out / "subjects.csv")) == 8


def _table_row(stdout: str, label: str) -> list[str]:
    """The cells of the table row that starts with ``label`` (rich's box-drawing table)."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no {label!r} row in:\n{stdout}")


def test_two_methods_without_a_significant_difference_name_no_winner(tmp_path: Path) -> None:
    """Each method is the sharper one for some subjects: the means differ, the paired t-test
    does not find it significant (p >= 0.05), so neither the table nor summary.json calls one
    of them better; the p-value and the mean difference are still reported."""
    hr, sharp, blurry = dataset(tmp_path, subjects=3)
    first, second = tmp_path / "first", tmp_path / "second"
    for i, (a, b) in enumerate([(sharp, blurry), (sharp, blurry), (blurry, sharp)]):
        for source, target in ((a, first), (b, second)):
            (name,) = source.glob(f"sub-0{i}_*")
            target.mkdir(exist_ok=True)
            shutil.copy(name, target / name.name)
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", first, "--pred", second, "--out", out, "--no-tissue")
    assert result.exit_code == 0, result.output
    assert _table_row(result.stdout, "better")[2:] == ["n.s."] * 8
    assert "n.s.: no significant difference" in result.stdout
    comparison = json.loads((out / "summary.json").read_text())["comparison"]
    for key in ("ssim", "psnr", "nrmse", "ssim_mask", "psnr_mask", "nrmse_mask", "hf_corr"):
        test = comparison["metrics"][key]
        assert test["p"] >= 0.05 and test["mean_difference"] != 0, key
        assert test["better"] is None and test["significant"] is False, key
        assert f"{test['p']:.3g}" in _table_row(result.stdout, "p-value"), key


def test_many_methods_in_one_table(tmp_path: Path) -> None:
    """Any number of --pred folders (the README's results table has eight); the paired t-test is
    only for exactly two."""
    hr, sharp, blurry = dataset(tmp_path, subjects=2)
    third = tmp_path / "copy"
    shutil.copytree(sharp, third)
    out = tmp_path / "report"
    result = invoke(
        "--ref", hr, "--pred", sharp, "--pred", blurry, "--pred", third, "--out", out, *FAST
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["sharp", "blurry", "copy"]
    assert summary["comparison"] is None and "p-value" not in result.stdout
    assert "t-test" not in result.stdout and summary["settings"]["test"] is None
    psnr = {m: v["metrics"]["psnr"]["mean"] for m, v in summary["methods"].items()}
    assert psnr["copy"] == pytest.approx(psnr["sharp"]) and psnr["sharp"] > psnr["blurry"]
    assert len(read_rows(out / "subjects.csv")) == 6


def _count_n4(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the volumes fidelity hands to N4, one entry a call (the real N4 runs)."""
    from mrisr_cli import fidelity

    calls: list[tuple[int, ...]] = []
    real = fidelity.n4_correct

    def spy(data: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        calls.append(tuple(data.shape))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(fidelity, "n4_correct", spy)
    return calls


def test_n4_corrects_both_images_before_fidelity_unless_no_n4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tissue Dice compares N4-corrected images: the reference and the prediction, once each;
    --no-n4 runs no N4 at all."""
    hr, sharp, _ = dataset(tmp_path, subjects=1)
    calls = _count_n4(monkeypatch)
    result = invoke("--ref", hr, "--pred", sharp, "--out", tmp_path / "n4", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert calls == [SHAPE, SHAPE]
    assert json.loads((tmp_path / "n4" / "summary.json").read_text())["settings"]["n4"] is True
    calls.clear()
    args = ["--ref", hr, "--pred", sharp, "--out", tmp_path / "plain", "--threads", "1"]
    result = invoke(*args, *FAST)
    assert result.exit_code == 0, result.output
    assert calls == []
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["settings"]["n4"] is False


def test_parcellation_weights_end_to_end_with_n4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hr, sharp, _ = dataset(tmp_path, subjects=1)
    n4_calls = _count_n4(monkeypatch)
    torch.manual_seed(0)
    weights = tmp_path / "highres3dnet.pth"
    torch.save(HighRes3DNet().state_dict(), weights)
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", sharp, "--parcellation-weights", weights, "--out", out)
    assert result.exit_code == 0, result.output
    assert "M_h" in result.stdout and "Dice" in result.stdout
    rows = read_rows(out / "subjects.csv")
    for r in rows:
        assert float(r["mh"]) > 0 and 0 <= float(r["parc_dice"]) <= 1
        terms = [float(r[f"mh_layer_{k}"]) for k in range(1, 7)]
        assert float(r["mh"]) == pytest.approx(sum(terms))
    labels = read_rows(out / "parcellation_dice.csv")
    assert labels and {r["subject"] for r in labels} == {"sub-00_T1w"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["n4"] is True and "1 / mean|f(HR)|" in summary["settings"]["m_h"]
    assert n4_calls == [SHAPE, SHAPE]  # the reference and the prediction, before M_h and Dice
    # the documented defaults (docs/evaluate.md, "Anatomical fidelity", steps 3-4): a crop to the
    # mask's bounding box plus 8 voxels, tiles with a core of at most 112^3 and a border of 8
    documented = {"window": 112, "border": 8, "margin": 8}
    assert summary["settings"]["highres3dnet_tiles"] == documented
    # SHAPE fits one tile: more context changes only the crop around the mask, which is recorded
    wide = tmp_path / "wide"
    context = RECEPTIVE_RADIUS  # the value the docs give for one exact pass
    args = ["--parcellation-weights", weights, "--parcellation-context", str(context)]
    assert invoke("--ref", hr, "--pred", sharp, *args, "--out", wide).exit_code == 0
    tiles = json.loads((wide / "summary.json").read_text())["settings"]["highres3dnet_tiles"]
    assert tiles == {**documented, "border": context, "margin": context}


def _in_worker(
    record: Path, wait_for: int, fn: Callable[..., list[PairResult]], *args: object
) -> list[PairResult]:
    """Run ``fn`` in a worker after noting the worker's pid in ``record``, and wait (up to a
    minute) until ``wait_for`` workers have done so: then two subjects cannot both run in the
    first worker to start. The test is not slower: the second subject waits for the second
    worker, which the pool starts at once."""
    (record / str(os.getpid())).write_text(str(torch.get_num_threads()))
    deadline = time.monotonic() + 60
    while len(list(record.iterdir())) < wait_for and time.monotonic() < deadline:
        time.sleep(0.02)
    return fn(*args)


def test_parallel_jobs_give_the_same_numbers_in_several_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--jobs 2`` on two subjects: each subject is evaluated in its own worker process (not
    this one), and the numbers are those of the sequential run."""
    hr, sharp, _ = dataset(tmp_path, subjects=2)
    record = tmp_path / "pids"
    record.mkdir()

    class SpyPool(WorkerPool):
        def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
            return super().submit(_in_worker, record, 2, fn, *args)

    monkeypatch.setattr(evaluation_module, "WorkerPool", SpyPool)
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke("--ref", hr, "--pred", sharp, "--out", one, *FAST).exit_code == 0
    assert not list(record.iterdir())  # one job: no worker process
    result = invoke(
        "--ref", hr, "--pred", sharp, "--out", two, "--jobs", "2", "--threads", "2", *FAST
    )
    assert result.exit_code == 0, result.output
    workers = {int(p.name) for p in record.iterdir()}
    assert len(workers) == 2 and os.getpid() not in workers
    assert {p.read_text() for p in record.iterdir()} == {"1"}  # --threads 2 shared by 2 workers
    assert read_rows(one / "subjects.csv") == read_rows(two / "subjects.csv")


def test_evaluate_from_python_leaves_the_callers_threads_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guard, not a regression test (before, only an explicit EvaluationOptions(threads=N)
    changed them): in-process (one job), evaluate() leaves the caller's torch, ITK and
    environment thread settings as they were; only worker processes get a share."""
    from mrisr_cli.evaluation import EvaluationOptions, evaluate

    hr, sharp, _ = dataset(tmp_path, subjects=2)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    environment = dict(os.environ)
    options = EvaluationOptions(n4=False, tissue=False)
    evaluation = evaluate(hr, [sharp], options=options, jobs=1)
    assert all(not r.error for r in evaluation.results)
    assert torch.get_num_threads() == before and dict(os.environ) == environment


def test_a_prediction_on_another_intensity_scale_is_warned(tmp_path: Path) -> None:
    """A prediction stored 0-1 (or z-scored) against a 0-150 reference was scored (PSNR ~5 dB)
    with exit 0 and no sign of why; now each such pair gets a warning, once, in the output and
    in summary.json, and subjects.csv gives every pair's scale ratio. The scores are unchanged."""
    from mrisr_cli.metrics import image_metrics

    hr, sharp, _ = dataset(tmp_path, subjects=3)
    unit = ndi.gaussian_filter(head(0), 0.6) / 150.0
    save(sharp / "sub-00_desc-sr_T1w.nii.gz", unit)
    blurred = ndi.gaussian_filter(head(1), 0.6)
    save(sharp / "sub-01_desc-sr_T1w.nii.gz", (blurred - blurred.mean()) / blurred.std())
    out = tmp_path / "report"
    args = ["--ref", hr, "--pred", sharp, "--out", out, "--no-tissue", "--threads", "1", *FAST]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    for subject in ("sub-00_T1w", "sub-01_T1w"):
        line = f"mrisr: warning: sharp/{subject}: the prediction's intensity scale is 0.0"
        assert result.stderr.count(line) == 1, result.stderr
    assert "sub-02_T1w" not in result.stderr and result.stderr.count("warning:") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert sum("intensity scale" in note for note in summary["notes"]) == 2
    assert "outside 1/2 to 2" in summary["settings"]["scale_ratio"]
    rows = {r["subject"]: r for r in read_rows(out / "subjects.csv")}
    assert float(rows["sub-00_T1w"]["scale_ratio"]) < 0.01
    assert float(rows["sub-01_T1w"]["scale_ratio"]) < 0.05
    assert 0.8 < float(rows["sub-02_T1w"]["scale_ratio"]) < 1.1  # blurred, same scale
    ref = np.asarray(nib.load(str(hr / "sub-00_T1w.nii.gz")).dataobj)
    expected = image_metrics(ref, unit, reference_mask(ref)).psnr
    assert float(rows["sub-00_T1w"]["psnr"]) == pytest.approx(expected, rel=1e-6)


def test_the_scale_check_passes_blur_noise_and_a_degraded_input() -> None:
    """The criterion (1st-99th percentile range ratio outside [1/2, 2]) flags rescaled copies
    and none of what a super-resolution method or the low-resolution input looks like."""
    from mrisr_cli.degradation import DegradationConfig, degrade_volume
    from mrisr_cli.metrics import intensity_scale_ratio, scale_differs

    ref = head(0)
    mask = reference_mask(ref)
    rng = np.random.default_rng(0)
    lowres = degrade_volume(ref, DegradationConfig(n4=False))
    same_scale = {
        "blur": ndi.gaussian_filter(ref, 1.5),
        "noise": ref + rng.normal(0, 10, SHAPE).astype(np.float32),
        "offset": ref + 20,
        "degraded": lowres,
        "contrast 1.5x": 1.5 * ref,
    }
    for name, pred in same_scale.items():
        assert not scale_differs(intensity_scale_ratio(ref, pred, mask)), name
    other_scale = {"0-1": ref / ref.max(), "z": (ref - ref.mean()) / ref.std(), "x10": ref * 10}
    for name, pred in other_scale.items():
        assert scale_differs(intensity_scale_ratio(ref, pred, mask)), name
    assert math.isnan(intensity_scale_ratio(np.ones(SHAPE), ref, mask))  # no scale to compare


def test_identical_volumes_report_infinite_psnr(tmp_path: Path) -> None:
    hr, _, _ = dataset(tmp_path, subjects=2)
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", hr, "--out", out, "--no-tissue", *FAST)
    assert result.exit_code == 0, result.output
    rows = read_rows(out / "subjects.csv")
    assert all(float(r["psnr"]) == math.inf and float(r["ssim"]) == 1.0 for r in rows)
    assert all(float(r["nrmse"]) == 0.0 for r in rows)
    psnr = json.loads((out / "summary.json").read_text())["methods"]["hr"]["metrics"]["psnr"]
    assert psnr["mean"] == "inf" and psnr["n_infinite"] == 2


# --- pairing ---------------------------------------------------------------------------------


def test_name_matching_rules() -> None:
    assert name_score("sub-01_T1w", "sub-01_desc-sr_T1w") == 2
    assert name_score("sub-01_T1w", "sub-01_T1w_pred") == 2
    assert name_score("sub-01_T1w", "sub-010_T1w") == 0
    assert name_score("T1w_sub01", "T1w_sub02") == 0
    assert name_score("S01", "S01") > name_score("S01", "S01_sr")
    refs = [Path(n) for n in ("sub-01_T1w.nii.gz", "sub-01_ses-2_T1w.nii.gz", "sub-02_T1w.nii")]
    preds = [
        Path(n)
        for n in ("sub-01_ses-2_desc-sr_T1w.nii.gz", "sub-01_desc-sr_T1w.nii.gz", "other.nii.gz")
    ]
    pairing = match_files(refs, preds)
    assert pairing.matches == {
        "sub-01_ses-2_T1w": Path("sub-01_ses-2_desc-sr_T1w.nii.gz"),  # longest stem wins
        "sub-01_T1w": Path("sub-01_desc-sr_T1w.nii.gz"),
    }
    assert pairing.unmatched == ("other.nii.gz",) and pairing.unmatched_refs == ("sub-02_T1w.nii",)
    tied = match_files([Path("a_T1w.nii"), Path("a_T2w.nii")], [Path("a.nii")])
    assert not tied.matches and tied.ambiguous and not tied.unmatched
    twins = match_files([Path("x.nii"), Path("x.nii.gz"), Path("y.nii")], [Path("x_sr.nii")])
    assert not twins.matches and twins.unmatched_refs == ("y.nii",)
    assert twins.ambiguous == ("x.nii, x.nii.gz share the name x: left out",)


def test_bids_mask_names_pair_with_their_scan() -> None:
    """fMRIPrep's ``sub-01_desc-brain_mask`` never paired with ``sub-01_desc-preproc_T1w`` (or
    ``sub-01_T1w``): their names share only ``sub-01``. A mask left unpaired by name now pairs
    with the one reference of the same BIDS entities (all but desc); another space never pairs,
    two masks of one scan pair with neither, and names that paired before pair as before."""
    from mrisr_cli.pairing import match_masks

    refs = [
        Path(n)
        for n in (
            "sub-01_desc-preproc_T1w.nii.gz",
            "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz",
            "sub-02_ses-1_T1w.nii.gz",
            "sub-03_T1w.nii",
            "sub-04_desc-raw_T1w.nii",
            "sub-04_desc-preproc_T1w.nii",
            "sub-05_T1w.nii",
        )
    ]
    masks = [
        Path(n)
        for n in (
            "sub-01_desc-brain_mask.nii.gz",
            "sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
            "sub-02_ses-1_desc-brain_mask.nii.gz",
            "sub-03_desc-brain_mask.nii",
            "sub-03_desc-head_mask.nii",
            "sub-04_desc-raw_T1w_mask.nii",  # paired by name, as before
            "sub-04_desc-preproc_T1w_mask.nii",
            "sub-05_space-MNI_desc-brain_mask.nii",  # another grid than the native scan's
        )
    ]
    pairing = match_masks(refs, masks)
    assert pairing.matches == {
        "sub-01_desc-preproc_T1w": masks[0],
        "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w": masks[1],
        "sub-02_ses-1_T1w": masks[2],
        "sub-04_desc-raw_T1w": masks[5],
        "sub-04_desc-preproc_T1w": masks[6],
    }
    assert set(pairing.unmatched_refs) == {"sub-03_T1w.nii", "sub-05_T1w.nii"}
    assert any(
        "sub-03_desc-brain_mask.nii, sub-03_desc-head_mask.nii" in a for a in pairing.ambiguous
    )


def test_automatic_mask_keeps_dark_csf_and_drops_noisy_air() -> None:
    grid = np.indices((40, 40, 40)).astype(np.float32)
    radius = np.sqrt(((grid - 19.5) ** 2).sum(axis=0))
    brain = np.select([radius < 10, radius < 14, radius < 16], [300.0, 200.0, 40.0], 0.0)
    stripped = reference_mask(brain.astype(np.float32))  # zero background, CSF rim at 40
    np.testing.assert_array_equal(stripped, radius < 16)
    rng = np.random.default_rng(0)
    head = brain + np.abs(rng.normal(0, 8, brain.shape))  # air: noise, never exactly 0
    assert reference_mask(head.astype(np.float32)).sum() == pytest.approx(
        (radius < 16).sum(), rel=0.05
    )


def test_paired_statistics_match_scipy() -> None:
    from scipy import stats

    a = [0.90, 0.92, 0.95, 0.91]
    b = [0.89, 0.90, 0.94, 0.92]
    results = [PairResult("a", f"s{i}", "", "", {"ssim": v}) for i, v in enumerate(a)]
    results += [PairResult("b", f"s{i}", "", "", {"ssim": v}) for i, v in enumerate(b)]
    results.append(PairResult("b", "s9", "", "", error="broken"))
    metric = [METRIC_BY_KEY["ssim"]]
    test = paired_tests(results, "a", "b", metric)["ssim"]
    expected = stats.ttest_rel(a, b)
    assert test.p == pytest.approx(expected.pvalue) and test.t == pytest.approx(expected.statistic)
    # a's mean is higher, but p = 0.32: no method is named better
    assert test.n == 4 and test.p > 0.05 and test.mean_difference > 0
    assert test.better is None and not test.significant
    # lower is better for NRMSE; a consistent difference is significant and names b
    nrmse = [PairResult("a", f"s{i}", "", "", {"nrmse": 0.1 + 0.01 * i}) for i in range(4)]
    nrmse += [PairResult("b", f"s{i}", "", "", {"nrmse": 0.08 + 0.011 * i}) for i in range(4)]
    test = paired_tests(nrmse, "a", "b", [METRIC_BY_KEY["nrmse"]])["nrmse"]
    assert test.p < 0.05 and test.significant and test.better == "b"
    # HF power: 1 is ideal, neither direction better; the same significant difference names none
    power = [
        PairResult(r.method, r.subject, "", "", {"hf_power": r.values["nrmse"]}) for r in nrmse
    ]
    test = paired_tests(power, "a", "b", [METRIC_BY_KEY["hf_power"]])["hf_power"]
    assert test.p < 0.05 and test.significant and test.better is None
    summary = summarise(results, ["a", "b"], metric)
    assert summary["b"]["ssim"].n == 4
    assert summary["a"]["ssim"].std == pytest.approx(np.std(a, ddof=1))


# --- bad input -------------------------------------------------------------------------------


def test_empty_reference_folder(tmp_path: Path) -> None:
    (tmp_path / "hr").mkdir()
    _, sharp, _ = dataset(tmp_path / "x")
    result = invoke("--ref", tmp_path / "hr", "--pred", sharp)
    assert result.exit_code == 1
    assert "no images" in result.stderr and "Traceback" not in result.output


def test_a_folder_with_images_only_in_subfolders_says_so(tmp_path: Path) -> None:
    """A BIDS tree (hr/sub-01/anat/...) stopped with 'no images ... in it' and no hint."""
    bids = tmp_path / "hr"
    save(bids / "sub-00" / "anat" / "sub-00_T1w.nii.gz", head(0))
    save(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz", head(1))
    _, sharp, _ = dataset(tmp_path / "x")
    result = invoke("--ref", bids, "--pred", sharp)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert (
        f"reference folder {bids}: no images directly in it (2 in subfolders, e.g. "
        "sub-00/anat/sub-00_T1w.nii.gz: evaluate reads one folder level" in result.stderr
    )


def test_missing_prediction_folder(tmp_path: Path) -> None:
    hr, _, _ = dataset(tmp_path)
    result = invoke("--ref", hr, "--pred", tmp_path / "nope")
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_no_matching_names(tmp_path: Path) -> None:
    hr, _, _ = dataset(tmp_path)
    save(tmp_path / "sr" / "patient_A.nii.gz", head(0))
    result = invoke("--ref", hr, "--pred", tmp_path / "sr")
    assert result.exit_code == 1 and "matches a reference" in result.stderr


def test_one_bad_shape_does_not_stop_the_others(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path)
    save(sharp / "sub-01_desc-sr_T1w.nii.gz", head(1)[:, :, :-2])
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", sharp, "--out", out, *FAST)
    assert result.exit_code == 0
    assert "sharp/sub-01_T1w: prediction shape (22, 24, 18) differs" in result.stderr
    rows = {r["subject"]: r for r in read_rows(out / "subjects.csv")}
    assert rows["sub-01_T1w"]["error"] and rows["sub-01_T1w"]["ssim"] == ""
    assert float(rows["sub-00_T1w"]["ssim"]) > 0.9 and float(rows["sub-02_T1w"]["ssim"]) > 0.9
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["sharp"]["evaluated"] == 2
    assert summary["methods"]["sharp"]["metrics"]["ssim"]["n"] == 2


def test_mismatched_affine_is_an_error_for_that_pair(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    save(sharp / "sub-02_desc-sr_T1w.nii.gz", head(2), affine=shifted)
    result = invoke("--ref", hr, "--pred", sharp, *FAST)
    assert result.exit_code == 0
    assert "sub-02_T1w: prediction affine differs" in result.stderr
    assert result.stderr.count("mrisr: error:") == 1


def test_a_flipped_prediction_is_refused_as_another_orientation(tmp_path: Path) -> None:
    """A prediction stored flipped (or with axes swapped) with a correct affine sits where the
    reference does; the error gave the affines' difference in mm as if it were misplaced."""
    hr, sharp, _ = dataset(tmp_path)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SHAPE[0] - 1
    save(sharp / "sub-00_desc-sr_T1w.nii.gz", head(0)[::-1], affine=AFFINE @ flip)
    swap = np.eye(4)[[1, 0, 2, 3]]  # voxel axes 0 and 1 swapped
    save(sharp / "sub-01_desc-sr_T1w.nii.gz", head(1).transpose(1, 0, 2), affine=AFFINE @ swap)
    result = invoke("--ref", hr, "--pred", sharp, "--no-tissue", "--threads", "1", *FAST)
    assert result.exit_code == 0, result.output
    assert (
        "sharp/sub-00_T1w: prediction is stored in another orientation (RAS vs the "
        "reference's LAS) on the same grid; reorient it" in result.stderr
    )
    assert "sharp/sub-01_T1w: prediction is stored in another orientation (ALS vs" in (
        result.stderr
    )
    assert " mm)" not in result.stderr and "shape" not in result.stderr
    assert _table_row(result.stdout, "sharp")[1] == "1"  # refused all the same
    # flipped and 2 mm away: not the same place, so the millimetre message stays
    moved = AFFINE @ flip
    moved[1, 3] += 2.0
    save(sharp / "sub-00_desc-sr_T1w.nii.gz", head(0)[::-1], affine=moved)
    result = invoke("--ref", hr, "--pred", sharp, "--no-tissue", "--threads", "1", *FAST)
    assert "sharp/sub-00_T1w: prediction affine differs from the reference's (by up to" in (
        result.stderr
    )
    # reoriented onto the reference's voxel order as docs/evaluate.md shows, it is scored
    image = nib.load(str(sharp / "sub-01_desc-sr_T1w.nii.gz"))
    reference = nib.load(str(hr / "sub-01_T1w.nii.gz"))
    transform = nib.orientations.ornt_transform(
        nib.io_orientation(image.affine), nib.io_orientation(reference.affine)
    )
    nib.save(image.as_reoriented(transform), str(sharp / "sub-01_desc-sr_T1w.nii.gz"))
    result = invoke("--ref", hr, "--pred", sharp, "--no-tissue", "--threads", "1", *FAST)
    assert "sub-01_T1w" not in result.stderr and _table_row(result.stdout, "sharp")[1] == "2"


def test_nan_in_a_prediction(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path)
    bad = head(0)
    bad[5, 5, 5] = np.nan
    save(sharp / "sub-00_desc-sr_T1w.nii.gz", bad)
    result = invoke("--ref", hr, "--pred", sharp, *FAST)
    assert result.exit_code == 0
    # the pair once, then the file once (by name: the folder is the method)
    line = "sharp/sub-00_T1w: prediction sub-00_desc-sr_T1w.nii.gz: 1 NaN or infinite voxels"
    assert line in result.stderr
    assert result.stderr.count("sub-00_desc-sr_T1w.nii.gz") == 1
    assert str(sharp) not in result.stderr


def test_no_pair_evaluable_exits_non_zero(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path, subjects=2)
    for i in range(2):
        save(sharp / f"sub-0{i}_desc-sr_T1w.nii.gz", head(i)[:-1])
    result = invoke("--ref", hr, "--pred", sharp, *FAST)
    assert result.exit_code == 1 and "no pair could be evaluated" in result.stderr


def test_wrong_parcellation_weights_file(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path)
    weights = tmp_path / "weights.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, weights)
    result = invoke("--ref", hr, "--pred", sharp, "--parcellation-weights", weights)
    assert result.exit_code == 1
    assert "not HighRes3DNet weights" in result.stderr and result.stderr.count("\n") == 1


def test_no_prediction_folder(tmp_path: Path) -> None:
    hr, _, _ = dataset(tmp_path, subjects=1)
    from mrisr_cli.errors import InputError
    from mrisr_cli.pairing import plan

    with pytest.raises(InputError, match="at least one --pred"):
        plan(hr, [], None)
    result = invoke("--ref", hr)
    assert result.exit_code != 0 and "--pred" in result.output


def test_existing_report_needs_overwrite(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path, subjects=2)
    out = tmp_path / "report"
    args = ["--ref", hr, "--pred", sharp, "--out", out, "--no-tissue", *FAST]
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    assert invoke(*args, "--overwrite").exit_code == 0


def test_overwriting_a_report_leaves_no_file_of_the_earlier_run(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path, subjects=3)
    out = tmp_path / "report"
    assert invoke("--ref", hr, "--pred", sharp, "--out", out, "--no-tissue", *FAST).exit_code == 0
    (out / "parcellation_dice.csv").write_text("method,subject\nold,sub-09\n")  # an older run's
    (hr / "sub-02_T1w.nii.gz").unlink()
    args = ["--ref", hr, "--pred", sharp, "--out", out, "--no-tissue", "--overwrite"]
    assert invoke(*args, *FAST).exit_code == 0
    assert not (out / "parcellation_dice.csv").exists()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["boxplots.png", "slices_sub-00_T1w.png", "slices_sub-01_T1w.png"]


def test_the_users_own_files_in_the_report_folder_are_left_alone(tmp_path: Path) -> None:
    """A file mrisr never wrote in the report folder made the run stop without --overwrite
    ('already exists', though it would not be written) and was deleted with it."""
    hr, sharp, _ = dataset(tmp_path, subjects=2)
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "my_figure.png").write_text("mine")
    (out / "notes.txt").write_text("mine")
    args = ["--ref", hr, "--pred", sharp, "--out", out, "--no-tissue", "--threads", "1", *FAST]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report_files"] == [
        "subjects.csv",
        "figures/boxplots.png",
        "figures/slices_sub-00_T1w.png",
        "figures/slices_sub-01_T1w.png",
        "summary.json",
    ]
    again = invoke(*args)  # the report's own files are still refused without --overwrite
    assert again.exit_code == 1 and "subjects.csv: already exists" in again.stderr
    (hr / "sub-01_T1w.nii.gz").unlink()
    # named like a report's figure, but not in the record: the user's (only the record says so)
    (out / "figures" / "slices_mine.png").write_text("mine")
    assert invoke(*args, "--overwrite").exit_code == 0
    assert (out / "figures" / "my_figure.png").read_text() == "mine"
    assert (out / "notes.txt").read_text() == "mine"
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["boxplots.png", "my_figure.png", "slices_mine.png", "slices_sub-00_T1w.png"]


def test_a_report_without_a_record_is_known_by_its_figure_names(tmp_path: Path) -> None:
    """A report whose summary.json lists no files (an earlier version's): its figures are those
    named like the report's (boxplots.png, slices_*.png); other files stay."""
    hr, sharp, _ = dataset(tmp_path, subjects=1)
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "figures" / "slices_sub-09_T1w.png").write_text("old report")
    (out / "figures" / "my_figure.png").write_text("mine")
    args = ["--ref", hr, "--pred", sharp, "--out", out, "--no-tissue", "--threads", "1", *FAST]
    result = invoke(*args)
    assert result.exit_code == 1 and "summary.json: already exists" in result.stderr
    (out / "summary.json").unlink()
    result = invoke(*args)
    assert result.exit_code == 1 and "slices_sub-09_T1w.png: already exists" in result.stderr
    assert invoke(*args, "--overwrite").exit_code == 0
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["boxplots.png", "my_figure.png", "slices_sub-00_T1w.png"]
    # a record names only the report's own files: one reaching elsewhere is not followed
    summary = json.loads((out / "summary.json").read_text())
    summary["report_files"] += ["../outside.txt", "figures/my_figure.png/../x.png"]
    (out / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "outside.txt").write_text("mine")
    assert invoke(*args, "--overwrite").exit_code == 0
    assert (tmp_path / "outside.txt").exists() and (out / "figures" / "my_figure.png").exists()


def test_hidden_files_are_not_predictions(tmp_path: Path) -> None:
    """A leftover ``.x.part.nii.gz`` or a macOS ``._x`` file must not tie with the real one."""
    hr, sharp, _ = dataset(tmp_path, subjects=2)
    real = sharp / "sub-00_desc-sr_T1w.nii.gz"
    shutil.copy(real, sharp / ".sub-00_desc-sr_T1w.nii.gz.k3j2.part.nii.gz")
    (sharp / "._sub-01_desc-sr_T1w.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    out = tmp_path / "report"
    args = ["--ref", hr, "--pred", sharp, "--out", out, "--no-tissue", "--threads", "1"]
    result = invoke(*args, *FAST)
    assert result.exit_code == 0, result.output
    assert "matched equally" not in result.output and "._" not in result.output
    rows = read_rows(out / "subjects.csv")
    assert [(r["subject"], r["error"]) for r in rows] == [("sub-00_T1w", ""), ("sub-01_T1w", "")]


def test_mask_folder_with_a_missing_and_a_wrong_mask(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path)
    masks = tmp_path / "masks"
    save(masks / "sub-00_T1w_mask.nii.gz", (head(0) > 50).astype(np.float32))
    save(masks / "sub-01_T1w_mask.nii.gz", np.ones((5, 5, 5), dtype=np.float32))
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", sharp, "--mask", masks, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    rows = {r["subject"]: r for r in read_rows(out / "subjects.csv")}
    assert rows["sub-00_T1w"]["error"] == ""
    assert "mask" in rows["sub-01_T1w"]["error"] and "shape" in rows["sub-01_T1w"]["error"]
    assert "no mask for sub-02_T1w.nii.gz" in rows["sub-02_T1w"]["error"]


def test_a_flipped_mask_is_named_as_another_orientation(tmp_path: Path) -> None:
    """A mask stored flipped on the reference's grid sits where it should; it was reported as
    an affine off by many millimetres. It gets the prediction's orientation message now."""
    hr, sharp, _ = dataset(tmp_path)
    masks = tmp_path / "masks"
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SHAPE[0] - 1
    for k in range(3):
        save(masks / f"sub-0{k}_T1w_mask.nii.gz", (head(k) > 50).astype(np.float32))
    # fMRIPrep's name pairs too (evaluate's plan pairs masks by pairing.match_masks)
    (masks / "sub-01_T1w_mask.nii.gz").rename(masks / "sub-01_desc-brain_mask.nii.gz")
    save(masks / "sub-00_T1w_mask.nii.gz", (head(0) > 50)[::-1].astype(np.float32), AFFINE @ flip)
    out = tmp_path / "report"
    result = invoke("--ref", hr, "--pred", sharp, "--mask", masks, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    rows = {r["subject"]: r for r in read_rows(out / "subjects.csv")}
    assert (
        "mask sub-00_T1w_mask.nii.gz is stored in another orientation (RAS vs the"
        in (rows["sub-00_T1w"]["error"])
    )
    assert " mm)" not in rows["sub-00_T1w"]["error"]
    assert rows["sub-01_T1w"]["error"] == "" and rows["sub-02_T1w"]["error"] == ""
    # a 2D or a 4D mask is a wrong shape for that pair, not an internal error for the run
    save(masks / "sub-00_T1w_mask.nii.gz", (head(0) > 50)[:, :, 10].astype(np.float32))
    stacked = np.stack([head(2) > 50] * 2, axis=-1).astype(np.float32)
    save(masks / "sub-02_T1w_mask.nii.gz", stacked)
    result = invoke(
        "--ref", hr, "--pred", sharp, "--mask", masks, "--out", out, "--overwrite", *FAST
    )
    assert result.exit_code == 0, result.output
    rows = {r["subject"]: r for r in read_rows(out / "subjects.csv")}
    assert "shape (22, 24) differs from the reference's" in rows["sub-00_T1w"]["error"]
    assert "shape (22, 24, 20, 2) differs from the reference's" in rows["sub-02_T1w"]["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu(tmp_path: Path) -> None:
    hr, sharp, _ = dataset(tmp_path)
    result = invoke("--ref", hr, "--pred", sharp, "--device", "cuda")
    assert result.exit_code == 1 and "no CUDA GPU" in result.stderr


# --- a folder of several alphas (upsample --alpha 0,0.5,1) ----------------------------------


def alpha_folder(root: Path, hr: Path, blurs: dict[str, float]) -> Path:
    """What ``mrisr upsample lr/ sr/ --alpha ...`` writes: ``<input>_alpha-<A>.nii.gz`` per
    reference and alpha (here a blur per alpha, so that the alphas score differently)."""
    for ref in sorted(hr.iterdir()):
        data = np.asarray(nib.load(str(ref)).dataobj, dtype=np.float32)
        stem = ref.name.removesuffix(".nii.gz")
        for alpha, sigma in blurs.items():
            save(root / f"{stem}_alpha-{alpha}.nii.gz", ndi.gaussian_filter(data, sigma))
            (root / f"{stem}_alpha-{alpha}.json").write_text("{}")  # upsample's sidecar
    return root


def test_a_folder_of_several_alphas_is_one_method_per_alpha(tmp_path: Path) -> None:
    """Every reference has one file per alpha: as one method they all tied and nothing paired
    (exit 1, 'no file in sr matches a reference'); each alpha is now a method of its own, in
    the same table and report as another --pred folder."""
    hr, _, blurry = dataset(tmp_path, subjects=3)
    sr = alpha_folder(tmp_path / "sr", hr, {"0": 1.2, "0.5": 0.8, "1": 0.4})
    out = tmp_path / "report"
    args = ["--ref", hr, "--pred", sr, "--pred", blurry, "--no-tissue", "--threads", "1", *FAST]
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    methods = ["sr_alpha-0", "sr_alpha-0.5", "sr_alpha-1", "blurry"]
    for name in methods:
        assert _table_row(result.stdout, name)[1] == "3"
    assert "matched equally" not in result.output and "without a reference" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == methods and summary["comparison"] is None
    assert [m["alpha"] for m in summary["methods"].values()] == [0.0, 0.5, 1.0, None]
    assert {m["folder"] for m in list(summary["methods"].values())[:3]} == {str(sr)}
    psnr = [summary["methods"][m]["metrics"]["psnr"]["mean"] for m in methods[:3]]
    assert psnr == sorted(psnr)  # less blur, higher PSNR: each alpha scored its own files
    rows = read_rows(out / "subjects.csv")
    assert len(rows) == 12 and all(r["error"] == "" for r in rows)
    pairs = {(r["method"], r["subject"]): r["prediction"] for r in rows}
    assert pairs["sr_alpha-0.5", "sub-01_T1w"] == "sub-01_T1w_alpha-0.5.nii.gz"
    assert pairs["blurry", "sub-01_T1w"] == "sub-01_T1w.nii"
    # a folder of exactly two alphas is two methods: the paired t-test compares them
    two = alpha_folder(tmp_path / "two", hr, {"0": 1.2, "1": 0.4})
    result = invoke("--ref", hr, "--pred", two, "--no-tissue", "--threads", "1", *FAST)
    assert result.exit_code == 0, result.output
    better = _table_row(result.stdout, "better")[2:]
    assert better == ["two_alpha-1"] * 6 + ["differ", "two_alpha-1"]  # HF power: no direction


def test_alpha_groups_keep_untagged_files_and_single_alpha_folders(tmp_path: Path) -> None:
    """Untagged files beside alpha-tagged ones are the folder's own method; a folder of one
    alpha is unchanged (one method named after the folder); a tie inside one alpha is a note
    that names the reference and the tied files."""
    from mrisr_cli.pairing import plan

    hr, _, _ = dataset(tmp_path, subjects=2)
    mixed = tmp_path / "sr"
    save(mixed / "sub-00_T1w.nii.gz", head(0))
    save(mixed / "sub-00_T1w_alpha-0.5.nii.gz", head(0))
    save(mixed / "sub-01_T1w_alpha-0.5.nii.gz", head(1))
    save(mixed / "sub-00_T1w_a_alpha-1.nii.gz", head(0))
    save(mixed / "sub-00_T1w_b_alpha-1.nii.gz", head(0))
    save(mixed / "sub-01_T1w_alpha-1.nii.gz", head(1))
    one = alpha_folder(tmp_path / "one", hr, {"0.5": 0.8})
    planned = plan(hr, [mixed, one], None)
    assert list(planned.methods) == ["sr", "sr_alpha-0.5", "sr_alpha-1", "one"]
    assert planned.alphas == {"sr": None, "sr_alpha-0.5": 0.5, "sr_alpha-1": 1.0}
    assert planned.pairings["sr"].matches == {"sub-00_T1w": mixed / "sub-00_T1w.nii.gz"}
    assert set(planned.pairings["sr_alpha-0.5"].matches) == {"sub-00_T1w", "sub-01_T1w"}
    tie = planned.pairings["sr_alpha-1"]
    assert list(tie.matches) == ["sub-01_T1w"]
    assert tie.ambiguous == (
        "sub-00_T1w.nii.gz is matched equally by sub-00_T1w_a_alpha-1.nii.gz, "
        "sub-00_T1w_b_alpha-1.nii.gz",
    )
    assert planned.pairings["one"].matches["sub-01_T1w"].name == "sub-01_T1w_alpha-0.5.nii.gz"


def test_ties_that_leave_nothing_paired_name_the_reference_and_the_candidates(
    tmp_path: Path,
) -> None:
    """Every reference tied between two files: the error said only that no name matched."""
    hr, _, _ = dataset(tmp_path, subjects=1)
    sr = tmp_path / "sr"
    save(sr / "sub-00_T1w_a.nii.gz", head(0))
    save(sr / "sub-00_T1w_b.nii.gz", head(0))
    result = invoke("--ref", hr, "--pred", sr, "--no-tissue", "--threads", "1", *FAST)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "matches a reference" not in result.stderr
    assert (
        "sub-00_T1w.nii.gz is matched equally by sub-00_T1w_a.nii.gz, sub-00_T1w_b.nii.gz"
        in result.stderr
    )


@pytest.mark.slow
def test_sigterm_during_n4_with_one_job_stops_at_once(tmp_path: Path) -> None:
    """With one job, N4 ran in evaluate's own process, deaf to signals until it returned: a
    SLURM time limit's SIGTERM waited for it. It now runs in a child process."""
    import sys

    grid = np.indices((68, 66, 70)).astype(np.float32)  # big enough for N4 to take minutes
    radius = np.sqrt(((grid - 33.0) ** 2).sum(axis=0)) / 33.0
    ref = np.select([radius < 0.4, radius < 0.7, radius < 0.9], [160.0, 100.0, 60.0], 0.0)
    ref = ndi.gaussian_filter(ref.astype(np.float32), 1.0) + 1.0
    hr = save(tmp_path / "hr" / "sub-01_T1w.nii.gz", ref).parent
    sharp = save(tmp_path / "sr" / "sub-01_T1w.nii.gz", ndi.gaussian_filter(ref, 0.6)).parent
    out, started = tmp_path / "report", tmp_path / "started"
    command = [
        *(sys.executable, "-c", n4_stop_script("fidelity", "n4_correct"), str(started)),
        *("evaluate", "--ref", str(hr), "--pred", str(sharp), "--out", str(out)),
        *("--jobs", "1", "--threads", "1"),
    ]
    sigterm_once_started(command, started)
    assert not out.exists(), "no report written"
