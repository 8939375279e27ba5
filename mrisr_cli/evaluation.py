"""`mrisr evaluate`: score every paired (reference, prediction) volume and drive the whole run.

Per subject: image metrics, tissue and parcellation fidelity. The :func:`evaluate` driver pairs
the folders (:mod:`mrisr_cli.pairing`), runs the subjects (in worker processes if asked), then
summarises and compares the methods (:mod:`mrisr_cli.evaluation_stats`); the report files are
:mod:`mrisr_cli.evaluation_report`. It never prints: progress goes through a callback, and a pair
that cannot be evaluated becomes a recorded error while the others go on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np

from mrisr_cli.errors import InputError, MrisrError
from mrisr_cli.evaluation_results import METRICS, Evaluation, MetricInfo, PairResult
from mrisr_cli.evaluation_stats import SIGNIFICANCE_LEVEL, paired_tests, summarise
from mrisr_cli.intensity import foreground_mask
from mrisr_cli.pairing import Plan, plan
from mrisr_cli.volumes import load_volume, nibabel_readable, strip_suffix
from mrisr_cli.workers import WorkerPool

AFFINE_TOLERANCE_MM = 1e-3
REORDER_TOLERANCE_MM = 1e-2  # only picks the message for a refused grid (float32 affines)
UNRELIABLE_BACKGROUND = 0.5  # parcellation background share of the mask that flags a failure

ProgressCallback = Callable[[str, int, int], None]


# --- per-subject evaluation ------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationOptions:
    """Everything a worker needs to evaluate one subject."""

    weights: Path | None = None
    tissue: bool = True
    n4: bool = True
    device: str = "cpu"
    window: int = 112
    border: int = 8
    margin: int = 8


@dataclass(frozen=True)
class SubjectTask:
    """One reference, its optional mask file, and the predictions to compare with it."""

    subject: str
    ref: Path
    mask: Path | None
    preds: tuple[tuple[str, Path], ...]
    preview: bool = False


_MODELS: dict[str, Any] = {}


def _model(weights: Path) -> Any:
    """HighRes3DNet loaded once per process (workers each keep their own copy)."""
    key = str(Path(weights).resolve())
    if key not in _MODELS:
        from mrisr_cli.networks.highres3dnet import load_highres3dnet

        _MODELS[key] = load_highres3dnet(Path(weights))
    return _MODELS[key]


def _corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World positions of the centres of a grid's 8 corner voxels."""
    index = np.array(list(itertools.product(*[(0, n - 1) for n in shape[:3]])), dtype=np.float64)
    return index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def _reordered(ref: Any, other: Any) -> bool:
    """Whether ``other`` holds the reference's voxel grid stored in another axis order or
    direction (flipped or permuted axes, the affine saying so): each of its voxel axes is one
    of the reference's, same length and voxel size, and the corners sit on the same points."""
    if len(ref.data.shape) != 3 or len(other.data.shape) != 3:
        return False
    a, b = np.asarray(ref.affine)[:3, :3], np.asarray(other.affine)[:3, :3]
    free = [0, 1, 2]
    for j in range(3):
        same = [
            i
            for i in free
            if ref.data.shape[i] == other.data.shape[j]
            and min(np.abs(b[:, j] - a[:, i]).max(), np.abs(b[:, j] + a[:, i]).max())
            <= REORDER_TOLERANCE_MM
        ]
        if not same:
            return False
        free.remove(same[0])
    ours, theirs = _corners(ref.affine, ref.data.shape), _corners(other.affine, other.data.shape)
    gaps = np.abs(theirs[:, None, :] - ours[None, :, :]).max(axis=2)  # corner to corner
    return bool((gaps.min(axis=1) <= REORDER_TOLERANCE_MM).all())


def _check_same_grid(ref: Any, other: Any, what: str) -> None:
    gap = float(np.abs(np.asarray(ref.affine) - np.asarray(other.affine)).max())
    same = ref.data.shape == other.data.shape and gap <= AFFINE_TOLERANCE_MM
    if not same and _reordered(ref, other):  # refused too, but it is not misplaced
        theirs, ours = ("".join(nib.aff2axcodes(v.affine)) for v in (other, ref))
        raise InputError(
            f"{what} is stored in another orientation ({theirs} vs the reference's {ours}) "
            "on the same grid; reorient it to the reference's voxel order first (e.g. "
            "nibabel's as_reoriented, docs/evaluate.md)"
        )
    if ref.data.shape != other.data.shape:
        raise InputError(
            f"{what} shape {other.data.shape} differs from the reference's {ref.data.shape}"
        )
    if gap > AFFINE_TOLERANCE_MM:
        raise InputError(
            f"{what} affine differs from the reference's (by up to {gap:.3g} mm); "
            "resample it onto the reference grid first"
        )


def reference_mask(data: np.ndarray) -> np.ndarray:
    """The automatic evaluation mask: the reference's brain (skull-stripped) or head, by the
    same rule ``upsample`` normalises with (:func:`mrisr_cli.intensity.foreground_mask`)."""
    return foreground_mask(data)


def _load_mask(path: Path | None, ref: Any) -> np.ndarray:
    """The given mask (voxels > 0) on the reference's grid, or :func:`reference_mask`."""
    if path is None:
        mask = reference_mask(ref.data)
        if not mask.any():
            raise InputError("automatic foreground mask of the reference is empty")
        return mask
    try:
        with nibabel_readable(path) as readable:
            image = nib.load(str(readable))
            data = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for foreign or truncated files
        raise InputError(f"mask {path.name}: not a readable image ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(
            f"mask {path.name}: shape {data.shape} differs from the reference's {ref.data.shape}"
        )
    # the prediction's checks, so that a mask stored flipped is named as such, not as misplaced
    _check_same_grid(ref, SimpleNamespace(data=data, affine=image.affine), f"mask {path.name}")
    mask = np.nan_to_num(data.astype(np.float32)) > 0
    if not mask.any():
        raise InputError(f"mask {path.name}: has no voxel > 0")
    return mask


def _preview(ref_n: np.ndarray, pred_n: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict:
    """An axial slice (RAS, through the mask's centre) of both normalised volumes."""
    from mrisr_cli.volumes import canonical_reorientation

    orient = canonical_reorientation(affine, ref_n.shape)
    mask_c = orient.apply(mask.astype(np.uint8)) > 0
    k = round(float(np.mean(np.nonzero(mask_c)[2]))) if mask_c.any() else ref_n.shape[2] // 2
    ref_c = orient.apply(ref_n)
    pred_c = orient.apply(pred_n)
    return {"ref": ref_c[:, :, k].copy(), "pred": pred_c[:, :, k].copy()}


def _load_named(path: Path, role: str) -> Any:
    """:func:`load_volume`, its errors naming the file once as ``<role> <file name>: ...``.

    load_volume's messages start with the path as given (``sr/sub-01_sr.nii.gz: ...``); the
    pair's line already names the method (the folder) and the subject, so the path would
    repeat them.
    """
    try:
        return load_volume(path)
    except InputError as exc:
        message = str(exc)
        prefix = f"{path}: "
        if message.startswith(prefix):
            message = message[len(prefix) :]
        raise InputError(f"{role} {path.name}: {message}") from exc


def evaluate_subject(task: SubjectTask, options: EvaluationOptions) -> list[PairResult]:
    """Every prediction of one subject; failures are recorded per pair, never raised."""
    results = [
        PairResult(method, task.subject, task.ref.name, pred.name) for method, pred in task.preds
    ]
    try:
        ref = _load_named(task.ref, "reference")
    except MrisrError as exc:
        for result in results:
            result.error = str(exc)
        return results
    try:
        mask = _load_mask(task.mask, ref)
    except MrisrError as exc:
        for result in results:
            result.error = str(exc)
        return results
    # N4 always sees the reference's whole head/brain: inside a small user mask (an ROI, a brain
    # mask on a head scan) its bias field extrapolates wildly outside and distorts the
    # histogram that HighRes3DNet's input normalisation depends on.
    n4_mask = mask if task.mask is None else reference_mask(ref.data)
    ref_corrected: np.ndarray | None = None
    for result, (_, pred_path) in zip(results, task.preds, strict=True):
        try:
            ref_corrected = _evaluate_pair(
                result, ref, (mask, n4_mask), pred_path, ref_corrected, task, options
            )
        except MrisrError as exc:
            result.error = str(exc)
        except Exception as exc:  # one odd pair (e.g. ANTs failing) must not stop the others
            result.error = f"unexpected {type(exc).__name__}: {exc}"
    return results


def _evaluate_pair(
    result: PairResult,
    ref: Any,
    masks: tuple[np.ndarray, np.ndarray],
    pred_path: Path,
    ref_corrected: np.ndarray | None,
    task: SubjectTask,
    options: EvaluationOptions,
) -> np.ndarray | None:
    """Fill ``result``; returns the N4-corrected reference so the next method reuses it.

    ``masks`` is (evaluation mask, N4 mask).
    """
    from mrisr_cli.fidelity import (
        FidelityConfig,
        bias_corrected,
        parcellation_fidelity,
        tissue_fidelity,
    )
    from mrisr_cli.metrics import image_metrics, normalise_pair

    mask, n4_mask = masks
    pred = _load_named(pred_path, "prediction")
    _check_same_grid(ref, pred, "prediction")
    metrics = image_metrics(ref.data, pred.data, mask, device=options.device)
    result.values.update(metrics.as_dict())
    _check_scale(result, ref.data, pred.data, n4_mask)
    if task.preview:
        ref_n, pred_n = normalise_pair(ref.data, pred.data)
        result.preview = _preview(ref_n.numpy(), pred_n.numpy(), mask, ref.affine)
    if not (options.tissue or options.weights):
        return ref_corrected
    if ref_corrected is None:
        ref_corrected = bias_corrected(ref.data, ref.spacing, n4_mask, options.n4)
    pred_corrected = bias_corrected(pred.data, ref.spacing, n4_mask, options.n4)
    if options.tissue:
        tissue = tissue_fidelity(ref_corrected, pred_corrected, mask)
        result.values["tissue_dice"] = tissue.dice_mean
        for index, value in enumerate(tissue.dice_classes, start=1):
            result.details[f"tissue_dice_{index}"] = value
    if options.weights:
        if max(abs(s - 1.0) for s in ref.spacing) > 0.2:
            spacing = "x".join(f"{s:.2f}" for s in ref.spacing)
            result.notes += (
                f"HighRes3DNet was trained on 1 mm images; {task.subject} has {spacing} mm voxels",
            )
        config = FidelityConfig(window=options.window, border=options.border, margin=options.margin)
        parc = parcellation_fidelity(
            _model(options.weights),
            ref_corrected,
            pred_corrected,
            mask,
            affine=ref.affine,
            config=config,
            device=options.device,
        )
        result.values["mh"] = parc.mh
        result.values["parc_dice"] = parc.dice_mean
        for index, (term, weight) in enumerate(
            zip(parc.mh_layers, parc.layer_weights, strict=True), start=1
        ):
            result.details[f"mh_layer_{index}"] = term
            result.details[f"mh_weight_{index}"] = weight
        result.dice_labels = parc.dice_labels
        result.details["parc_background_fraction"] = parc.background_fraction
        if parc.background_fraction > UNRELIABLE_BACKGROUND:
            result.notes += (
                f"HighRes3DNet labelled {parc.background_fraction:.0%} of the mask of "
                f"{task.subject} as background: it was trained on whole-head T1 scans and "
                "fails on skull-stripped ones, so its M_h and Dice are unreliable there",
            )
    return ref_corrected


def _check_scale(result: PairResult, ref: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> None:
    """Record the prediction's intensity scale against the reference's, and note a gross
    difference: the metrics scale both by the reference's min-max, so a prediction stored
    0-1 (or z-scored) against a 0-255 reference would score near zero with no other sign."""
    from mrisr_cli.metrics import SCALE_LIMIT, intensity_scale_ratio, scale_differs

    ratio = intensity_scale_ratio(ref, pred, mask)
    result.details["scale_ratio"] = ratio
    if scale_differs(ratio):
        result.notes += (
            f"{result.method}/{result.subject}: the prediction's intensity scale is {ratio:.3g} "
            "times the reference's (1st-99th percentile range in the reference's foreground, "
            f"expected within 1/{SCALE_LIMIT:g} to {SCALE_LIMIT:g}): both are scaled by the "
            "reference's min-max, so its scores measure the scale difference; put it on the "
            "reference's intensity scale first",
        )


# --- the whole evaluation ---------------------------------------------------------------------


def check_inputs(
    ref_dir: Path, preds: Sequence[Path], mask_dir: Path | None, options: EvaluationOptions
) -> Plan:
    """Raise the run's fatal errors (folders, names, weights file) before any work starts.

    Returns the plan, for :func:`evaluate` to run without listing and pairing the folders again.
    """
    planned = plan(ref_dir, preds, mask_dir)
    if options.weights is not None:
        _model(options.weights)
    return planned


def evaluate(
    ref_dir: Path,
    preds: Sequence[Path],
    *,
    mask_dir: Path | None = None,
    options: EvaluationOptions = EvaluationOptions(),
    jobs: int = 1,
    previews: int = 3,
    progress: ProgressCallback | None = None,
    planned: Plan | None = None,
) -> Evaluation:
    """Evaluate every matched pair (in ``jobs`` worker processes), then summarise and compare.

    ``planned`` is :func:`check_inputs`' plan of the same folders (else they are planned here).
    """
    if planned is None:
        planned = plan(ref_dir, preds, mask_dir)
    methods, pairings, mask_pairing = planned.methods, planned.pairings, planned.mask_pairing
    if options.weights is not None:
        _model(options.weights)  # a wrong weights file stops the run before any work (cached)
    tasks: list[SubjectTask] = []
    for ref in planned.refs:
        stem = strip_suffix(ref.name)
        subject_preds = tuple(
            (name, pairings[name].matches[stem])
            for name in methods
            if stem in pairings[name].matches
        )
        if not subject_preds:
            continue
        mask = mask_pairing.matches.get(stem) if mask_pairing else None
        tasks.append(SubjectTask(stem, ref, mask, subject_preds, preview=len(tasks) < previews))
    results: list[PairResult] = []
    missing_masks = [t.subject for t in tasks if mask_pairing is not None and t.mask is None]
    runnable = [t for t in tasks if t.subject not in missing_masks]
    for task in tasks:
        if task.subject in missing_masks:
            for name, pred in task.preds:
                results.append(
                    PairResult(
                        name,
                        task.subject,
                        task.ref.name,
                        pred.name,
                        error=f"no mask for {task.ref.name} in {mask_dir}",
                    )
                )
    results += _run_tasks(runnable, options, jobs, progress)
    order = {name: i for i, name in enumerate(methods)}
    results.sort(key=lambda r: (order[r.method], r.subject))
    evaluation = Evaluation(
        ref_dir=Path(ref_dir),
        methods=methods,
        results=results,
        pairings=pairings,
        metrics=_active_metrics(options),
        settings=_settings(options, mask_dir, jobs, compared=len(methods) == 2),
        labels=planned.labels,
        alphas=planned.alphas,
    )
    evaluation.notes = _notes(evaluation, options)
    if jobs > 1 and options.device.startswith("cuda"):
        evaluation.notes.append("--jobs applies to the CPU; on a GPU subjects ran one at a time")
    evaluation.summary = summarise(evaluation.results, list(methods), evaluation.metrics)
    if len(methods) == 2:
        first, second = list(methods)
        evaluation.comparison = paired_tests(evaluation.results, first, second, evaluation.metrics)
    return evaluation


def _run_tasks(
    tasks: list[SubjectTask],
    options: EvaluationOptions,
    jobs: int,
    progress: ProgressCallback | None,
) -> list[PairResult]:
    total = len(tasks)
    results: list[PairResult] = []
    if jobs <= 1 or total <= 1 or options.device.startswith("cuda"):
        for done, task in enumerate(tasks, start=1):
            results += evaluate_subject(task, options)
            if progress:
                progress(task.subject, done, total)
        return results
    import torch

    from mrisr_cli.threads import configure_threads

    workers = min(jobs, total)
    # the process's thread count (--threads, SLURM, or the affinity mask) shared by the workers:
    # torch, ITK (N4) and OpenMP, set in each worker only (a caller's process keeps its own)
    share = (max(1, torch.get_num_threads() // workers),)
    # spawned: forking with OpenMP threads running can deadlock
    with WorkerPool(workers, initializer=configure_threads, initargs=share) as pool:
        futures = {pool.submit(evaluate_subject, t, options): t for t in tasks}
        for done, future in enumerate(as_completed(futures), start=1):
            task = futures[future]
            try:
                results += future.result()
            except Exception as exc:  # a worker that died (e.g. killed for memory)
                results += [
                    PairResult(
                        name,
                        task.subject,
                        task.ref.name,
                        pred.name,
                        error=f"worker failed: {type(exc).__name__}: {exc}",
                    )
                    for name, pred in task.preds
                ]
            if progress:
                progress(task.subject, done, total)
    return results


def _active_metrics(options: EvaluationOptions) -> tuple[MetricInfo, ...]:
    skip = set()
    if not options.tissue:
        skip.add("tissue_dice")
    if options.weights is None:
        skip |= {"mh", "parc_dice"}
    return tuple(m for m in METRICS if m.key not in skip)


def _settings(
    options: EvaluationOptions, mask_dir: Path | None, jobs: int, *, compared: bool
) -> dict[str, Any]:
    from mrisr_cli.fidelity import MH_RULE, TISSUE_RULE
    from mrisr_cli.metrics import HF_RULE, NORMALISATION_RULE, SCALE_LIMIT, SSIM_RULE

    return {
        "normalisation": NORMALISATION_RULE,
        "ssim": SSIM_RULE,
        "psnr": "10 log10(1 / MSE) on the normalised intensities (inf when identical)",
        "nrmse": "||ref - pred|| / ||ref|| on the normalised intensities",
        "high_frequency": HF_RULE,
        "mask": str(mask_dir)
        if mask_dir
        else "automatic, from the reference: voxels above "
        "min + 0.1 x (99th percentile of the voxels above min - min), largest component, "
        "holes filled",
        "tissue": TISSUE_RULE if options.tissue else None,
        "m_h": MH_RULE if options.weights else None,
        "parcellation_weights": str(options.weights) if options.weights else None,
        "n4": options.n4,
        "n4_mask": "the automatic reference mask (also when --mask is given)",
        "scale_ratio": "the prediction's 1st-99th percentile range over the reference's, both in "
        f"the automatic reference mask; a pair outside 1/{SCALE_LIMIT:g} to {SCALE_LIMIT:g} gets "
        "a note (its scores unchanged)",
        "std": "sample standard deviation (ddof=1) over subjects with a finite value",
        "test": "paired two-tailed t-test (scipy.stats.ttest_rel) over subjects evaluated in "
        f"both methods; the better method is named only where p < {SIGNIFICANCE_LEVEL}"
        if compared
        else None,
        "device": options.device,
        "jobs": jobs,
        "highres3dnet_tiles": {
            "window": options.window,
            "border": options.border,
            "margin": options.margin,
        },
    }


def _notes(evaluation: Evaluation, options: EvaluationOptions) -> list[str]:
    notes: list[str] = []
    if options.weights is None:
        notes.append(
            "M_h and parcellation Dice not computed: no --parcellation-weights file given "
            "(HighRes3DNet weights, e.g. highres3dnet_li_parameters-7d297872.pth)"
        )
    if not options.tissue:
        notes.append("tissue Dice not computed (--no-tissue)")
    if not options.n4 and (options.tissue or options.weights):
        notes.append("N4 bias correction skipped (--no-n4); the paper applies it before M_h")
    for name, pairing in evaluation.pairings.items():
        folder = evaluation.labels.get(name) or str(evaluation.methods[name])
        if pairing.unmatched:
            notes.append(
                f"{folder}: {len(pairing.unmatched)} file(s) without a reference: "
                + ", ".join(pairing.unmatched[:5])
                + (" ..." if len(pairing.unmatched) > 5 else "")
            )
        if pairing.unmatched_refs and name in evaluation.methods:
            notes.append(
                f"{evaluation.ref_dir}: {len(pairing.unmatched_refs)} reference(s) without a "
                f"prediction in {folder}: "
                + ", ".join(pairing.unmatched_refs[:5])
                + (" ..." if len(pairing.unmatched_refs) > 5 else "")
            )
        for line in pairing.ambiguous:  # references sharing a name: once, not once per folder
            note = f"{folder}: {line}" if line in pairing.ties else f"{evaluation.ref_dir}: {line}"
            if note not in notes:
                notes.append(note)
    for result in evaluation.results:
        notes += [n for n in result.notes if n not in notes]
    return notes
