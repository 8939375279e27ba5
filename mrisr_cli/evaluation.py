"""`mrisr evaluate`: pair reference and prediction folders, measure every pair, compare methods.

The library side of the command: pairing by name, per-subject evaluation (image metrics, tissue
and parcellation fidelity), statistics (mean, std, paired two-tailed t-test) and the report
files. It never prints: progress goes through a callback, and a pair that cannot be evaluated
becomes a recorded error while the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mrisr_cli import __version__
from mrisr_cli.errors import InputError, MrisrError, OutputError
from mrisr_cli.intensity import foreground_mask
from mrisr_cli.volumes import (
    atomic_path,
    image_files,
    load_volume,
    nibabel_readable,
    strip_suffix,
)

AFFINE_TOLERANCE_MM = 1e-3
UNRELIABLE_BACKGROUND = 0.5  # parcellation background share of the mask that flags a failure
SIGNIFICANCE_LEVEL = 0.05  # a paired test names the better method only when p is below this


@dataclass(frozen=True)
class MetricInfo:
    """A column of the report: key, label in the table, and which direction is better."""

    key: str
    label: str
    higher_is_better: bool


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("ssim", "SSIM", True),
    MetricInfo("psnr", "PSNR", True),
    MetricInfo("nrmse", "NRMSE", False),
    MetricInfo("ssim_mask", "SSIM (mask)", True),
    MetricInfo("psnr_mask", "PSNR (mask)", True),
    MetricInfo("nrmse_mask", "NRMSE (mask)", False),
    MetricInfo("tissue_dice", "Tissue Dice", True),
    MetricInfo("mh", "M_h", False),
    MetricInfo("parc_dice", "Dice", True),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}

ProgressCallback = Callable[[str, int, int], None]


# --- pairing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pairing:
    """Which files of one folder belong to which reference, and which found no partner."""

    matches: dict[str, Path]  # reference stem -> file
    unmatched_refs: tuple[str, ...]
    unmatched: tuple[str, ...]  # names in the other folder without a reference
    ambiguous: tuple[str, ...]  # one line each: why a name could not be paired
    ties: tuple[str, ...] = ()  # the lines of ambiguous about this folder's names (not twin refs)


def list_volumes(folder: Path, what: str) -> list[Path]:
    """The image files of a folder (:func:`~mrisr_cli.volumes.image_files`: sorted, hidden
    files left out); an unusable or empty folder is an InputError."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{what} folder {folder}: does not exist")
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder}: is not a folder")
    files = image_files(folder)
    if not files:
        raise InputError(f"{what} folder {folder}: no images (.nii, .nii.gz, .mgz, .mgh) in it")
    return files


def _tokens(stem: str) -> list[str]:
    return [t for t in re.split(r"[_.]", stem.casefold()) if t]


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(token in remaining for token in short)


def name_score(ref_stem: str, other_stem: str) -> int:
    """How well two file stems match: 0 = not at all, more = a longer common stem.

    Names are split at ``_`` and ``.`` (BIDS entities such as ``sub-01`` stay whole); they match
    when the parts of one appear, in order, in the other: ``sub-01_T1w`` matches
    ``sub-01_desc-sr_T1w`` and ``sub-01_T1w_pred``, never ``sub-010_T1w``. Identical stems win.
    """
    if ref_stem == other_stem:
        return 10_000
    a, b = _tokens(ref_stem), _tokens(other_stem)
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return len(short) if short and _is_subsequence(short, long) else 0


def match_files(
    refs: Sequence[Path], others: Sequence[Path], *, stem: Callable[[str], str] = strip_suffix
) -> Pairing:
    """Pair each reference with the file whose name shares its longest stem (unique best only).

    References that share a stem (``X.nii`` and ``X.nii.gz``) cannot be told apart: both are
    left out, with a note. ``stem`` gives the name an other file is matched by (a folder split
    by alpha matches without the ``_alpha-A`` tag, so that the rules are those of one alpha).
    """
    by_stem: dict[str, list[Path]] = {}
    for path in refs:
        by_stem.setdefault(strip_suffix(path.name), []).append(path)
    ref_stems = {s: paths[0] for s, paths in by_stem.items() if len(paths) == 1}
    other_stems = {other: stem(other.name) for other in others}
    best_for_other: dict[Path, str] = {}
    ambiguous: list[str] = [
        f"{', '.join(p.name for p in paths)} share the name {s}: left out"
        for s, paths in by_stem.items()
        if len(paths) > 1
    ]
    twins = len(ambiguous)
    ambiguous_names: set[str] = set()
    for other in others:
        scores = {r: name_score(r, other_stems[other]) for r in ref_stems}
        top = max(scores.values(), default=0)
        if top == 0:
            continue
        winners = [r for r, s in scores.items() if s == top]
        if len(winners) > 1:
            ambiguous.append(f"{other.name} matches several references equally: {winners[:3]}")
            ambiguous_names.add(other.name)
            continue
        best_for_other[other] = winners[0]
    by_ref: dict[str, list[Path]] = {}
    for other, ref in best_for_other.items():
        by_ref.setdefault(ref, []).append(other)
    matches: dict[str, Path] = {}
    for ref, candidates in by_ref.items():
        scored = sorted(candidates, key=lambda o: -name_score(ref, other_stems[o]))
        top = name_score(ref, other_stems[scored[0]])
        tied = [o for o in scored if name_score(ref, other_stems[o]) == top]
        if len(tied) > 1:
            ambiguous.append(f"{ref_stems[ref].name} is matched equally by {_names(tied)}")
            ambiguous_names.update(o.name for o in tied)
            continue
        matches[ref] = scored[0]
    paired = set(matches.values())
    unmatched = tuple(o.name for o in others if o not in paired and o.name not in ambiguous_names)
    unmatched_refs = tuple(p.name for r, p in ref_stems.items() if r not in matches)
    return Pairing(matches, unmatched_refs, unmatched, tuple(ambiguous), tuple(ambiguous[twins:]))


def _names(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


_ALPHA_TAG = re.compile(r"(?:^|_)alpha-([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?=_|$)")


def alpha_tag(stem: str) -> tuple[float | None, str]:
    """The alpha that ``upsample --alpha A,B`` wrote into a name (``sub-01_T1w_alpha-0.5``), and
    the stem without that tag; (None, stem) for a name with no tag, or with more than one."""
    found = list(_ALPHA_TAG.finditer(stem))
    if len(found) != 1:
        return None, stem
    tag = found[0]
    return float(tag.group(1)), (stem[: tag.start()] + stem[tag.end() :]).strip("_")


def _untagged_stem(name: str) -> str:
    return alpha_tag(strip_suffix(name))[1]


# --- per-subject evaluation ------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationOptions:
    """Everything a worker needs to evaluate one subject."""

    weights: Path | None = None
    tissue: bool = True
    n4: bool = True
    device: str = "cpu"
    threads: int | None = None  # torch threads in a worker process
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


@dataclass
class PairResult:
    """The numbers for one (method, subject) pair, or the reason there are none."""

    method: str
    subject: str
    ref: str
    pred: str
    values: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)
    dice_labels: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    notes: tuple[str, ...] = ()
    preview: dict[str, np.ndarray] | None = None


_MODELS: dict[str, Any] = {}


def _model(weights: Path) -> Any:
    """HighRes3DNet loaded once per process (workers each keep their own copy)."""
    key = str(Path(weights).resolve())
    if key not in _MODELS:
        from mrisr_cli.networks.highres3dnet import load_highres3dnet

        _MODELS[key] = load_highres3dnet(Path(weights))
    return _MODELS[key]


def _check_same_grid(ref: Any, other: Any, what: str) -> None:
    if ref.data.shape != other.data.shape:
        raise InputError(
            f"{what} shape {other.data.shape} differs from the reference's {ref.data.shape}"
        )
    gap = float(np.abs(np.asarray(ref.affine) - np.asarray(other.affine)).max())
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
    if data.shape != ref.data.shape:
        raise InputError(
            f"mask {path.name}: shape {data.shape} differs from the reference's {ref.data.shape}"
        )
    gap = float(np.abs(np.asarray(image.affine) - np.asarray(ref.affine)).max())
    if gap > AFFINE_TOLERANCE_MM:
        raise InputError(f"mask {path.name}: affine differs from the reference's (by {gap:.3g} mm)")
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
    if options.threads:  # a worker's share: torch, ITK (N4) and OpenMP, not only torch
        from mrisr_cli.threads import configure_threads

        configure_threads(options.threads)
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


# --- the whole evaluation ---------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSummary:
    """Mean and sample standard deviation (ddof=1) over subjects with a finite value."""

    mean: float
    std: float
    n: int
    n_infinite: int = 0


@dataclass(frozen=True)
class PairedTest:
    """Paired two-tailed t-test of one metric between the two methods.

    ``better`` names the method with the better mean only when the difference is significant
    (``p`` < :data:`SIGNIFICANCE_LEVEL`); otherwise it is None, and ``mean_difference`` still
    gives the direction.
    """

    n: int
    mean_difference: float  # first method minus second
    t: float
    p: float
    better: str | None
    significant: bool = False


@dataclass
class Evaluation:
    """Results of a whole run, ready for the table and the report files."""

    ref_dir: Path
    methods: dict[str, Path]
    results: list[PairResult]
    pairings: dict[str, Pairing]
    metrics: tuple[MetricInfo, ...]
    summary: dict[str, dict[str, MetricSummary]] = field(default_factory=dict)
    comparison: dict[str, PairedTest] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # pairing -> how notes name its files
    alphas: dict[str, float | None] = field(default_factory=dict)  # methods of split folders

    @property
    def errors(self) -> list[PairResult]:
        return [r for r in self.results if r.error]

    @property
    def evaluated(self) -> list[PairResult]:
        return [r for r in self.results if not r.error]


def method_names(preds: Sequence[Path]) -> list[str]:
    """Folder names as method names; a repeated name gets -2, -3."""
    names: list[str] = []
    for folder in preds:
        base = Path(folder).resolve().name or "pred"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


@dataclass(frozen=True)
class Plan:
    """The run's methods and how the files of each pair with the references."""

    refs: list[Path]
    methods: dict[str, Path]  # method name -> its --pred folder
    pairings: dict[str, Pairing]  # also a split folder's group that pairs with nothing
    labels: dict[str, str]  # pairing name -> how notes name its files
    alphas: dict[str, float | None]  # methods of a folder split by alpha (None: untagged files)
    mask_pairing: Pairing | None


def _alpha_groups(files: Sequence[Path]) -> dict[float | None, list[Path]]:
    """The files by the alpha in their names: untagged first, then by increasing alpha."""
    groups: dict[float | None, list[Path]] = {}
    for path in files:
        groups.setdefault(alpha_tag(strip_suffix(path.name))[0], []).append(path)
    return dict(sorted(groups.items(), key=lambda item: (item[0] is not None, item[0] or 0.0)))


def _unique(name: str, taken: set[str]) -> str:
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def _unpaired_error(
    folder: Path, ref_dir: Path, files: list[Path], refs: list[Path], pairings: list[Pairing]
) -> InputError:
    """Why nothing in a --pred folder pairs: a tie (named, with its candidates), or no name."""
    ties = [line for pairing in pairings for line in pairing.ties]
    if ties:
        more = f" (and {len(ties) - 1} more tie(s))" if len(ties) > 1 else ""
        return InputError(
            f"no file in {folder} can be paired with a reference in {ref_dir}: {ties[0]}{more}; "
            "rename the files so that each reference has one best match, or put each method "
            "in its own --pred folder"
        )
    return InputError(
        f"no file in {folder} matches a reference in {ref_dir} by name "
        f"(e.g. {files[0].name} vs {refs[0].name}); names must share their stem, "
        "like sub-01_T1w.nii.gz and sub-01_desc-sr_T1w.nii.gz"
    )


def plan(ref_dir: Path, preds: Sequence[Path], mask_dir: Path | None) -> Plan:
    """List and pair the folders; raises InputError where a folder pairs nothing at all.

    A folder whose names carry several alphas (``upsample --alpha 0,0.5,1`` writes
    ``X_alpha-0``, ``X_alpha-0.5``, ``X_alpha-1`` per input) is one method per alpha, named
    ``<folder>_alpha-<A>``: as one method, its alphas would tie for every reference.
    """
    if not preds:
        raise InputError("give at least one --pred folder")
    refs = list_volumes(ref_dir, "reference")
    methods: dict[str, Path] = {}
    pairings: dict[str, Pairing] = {}
    labels: dict[str, str] = {}
    alphas: dict[str, float | None] = {}
    taken: set[str] = set()
    for base, folder in zip(method_names(preds), preds, strict=True):
        files = list_volumes(folder, "prediction")
        groups = _alpha_groups(files)
        if len(groups) == 1:
            pairing = match_files(refs, files)
            if not pairing.matches:
                raise _unpaired_error(folder, ref_dir, files, refs, [pairing])
            name = _unique(base, taken)
            methods[name], pairings[name], labels[name] = folder, pairing, str(folder)
            continue
        split = {a: match_files(refs, g, stem=_untagged_stem) for a, g in groups.items()}
        if not any(pairing.matches for pairing in split.values()):
            raise _unpaired_error(folder, ref_dir, files, refs, list(split.values()))
        for alpha, pairing in split.items():
            name = _unique(base if alpha is None else f"{base}_alpha-{alpha:g}", taken)
            tag = "names without _alpha-" if alpha is None else f"alpha {alpha:g}"
            pairings[name], labels[name] = pairing, f"{folder} ({tag})"
            if pairing.matches:  # a group that pairs nothing is only noted (its files)
                methods[name], alphas[name] = folder, alpha
    mask_pairing = None
    if mask_dir is not None:
        mask_pairing = match_files(refs, list_volumes(mask_dir, "mask"))
    return Plan(refs, methods, pairings, labels, alphas, mask_pairing)


def check_inputs(
    ref_dir: Path, preds: Sequence[Path], mask_dir: Path | None, options: EvaluationOptions
) -> None:
    """Raise the run's fatal errors (folders, names, weights file) before any work starts."""
    plan(ref_dir, preds, mask_dir)
    if options.weights is not None:
        _model(options.weights)


def evaluate(
    ref_dir: Path,
    preds: Sequence[Path],
    *,
    mask_dir: Path | None = None,
    options: EvaluationOptions = EvaluationOptions(),
    jobs: int = 1,
    previews: int = 3,
    progress: ProgressCallback | None = None,
) -> Evaluation:
    """Evaluate every matched pair (in ``jobs`` worker processes), then summarise and compare."""
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
    import multiprocessing

    import torch

    workers = min(jobs, total)
    # the process's thread count (--threads, SLURM, or the affinity mask) shared by the workers
    worker_options = replace(options, threads=max(1, torch.get_num_threads() // workers))
    # spawn, not fork: forking a process whose OpenMP/torch threads are running can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(evaluate_subject, t, worker_options): t for t in tasks}
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
    from mrisr_cli.metrics import NORMALISATION_RULE, SSIM_RULE

    return {
        "normalisation": NORMALISATION_RULE,
        "ssim": SSIM_RULE,
        "psnr": "10 log10(1 / MSE) on the normalised intensities (inf when identical)",
        "nrmse": "||ref - pred|| / ||ref|| on the normalised intensities",
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


# --- statistics -------------------------------------------------------------------------------


def summarise(
    results: Sequence[PairResult], methods: Sequence[str], metrics: Sequence[MetricInfo]
) -> dict[str, dict[str, MetricSummary]]:
    """Mean and std per method and metric; +inf (identical volumes) makes the mean inf."""
    summary: dict[str, dict[str, MetricSummary]] = {}
    for method in methods:
        rows = [r for r in results if r.method == method and not r.error]
        summary[method] = {}
        for metric in metrics:
            values = np.array([r.values.get(metric.key, math.nan) for r in rows], dtype=float)
            finite = values[np.isfinite(values)]
            n_inf = int(np.isinf(values).sum())
            if n_inf:
                mean = math.inf if np.all(values[np.isinf(values)] > 0) else math.nan
            else:
                mean = float(finite.mean()) if finite.size else math.nan
            std = float(finite.std(ddof=1)) if finite.size > 1 and not n_inf else math.nan
            summary[method][metric.key] = MetricSummary(mean, std, int(finite.size), n_inf)
    return summary


def paired_tests(
    results: Sequence[PairResult], first: str, second: str, metrics: Sequence[MetricInfo]
) -> dict[str, PairedTest]:
    """ttest_rel per metric over subjects with finite values for both methods; the better
    method is named only where p < :data:`SIGNIFICANCE_LEVEL`."""
    from scipy import stats

    by_method = {
        m: {r.subject: r for r in results if r.method == m and not r.error} for m in (first, second)
    }
    common = sorted(set(by_method[first]) & set(by_method[second]))
    tests: dict[str, PairedTest] = {}
    for metric in metrics:
        a = np.array([by_method[first][s].values.get(metric.key, math.nan) for s in common])
        b = np.array([by_method[second][s].values.get(metric.key, math.nan) for s in common])
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        n = int(a.size)
        if n < 2:
            tests[metric.key] = PairedTest(n, _mean(a - b), math.nan, math.nan, None)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            outcome = stats.ttest_rel(a, b)
        diff = float(np.mean(a - b))
        p = float(outcome.pvalue)
        significant = diff != 0 and math.isfinite(p) and p < SIGNIFICANCE_LEVEL
        better = None
        if significant:
            first_better = (diff > 0) == metric.higher_is_better
            better = first if first_better else second
        tests[metric.key] = PairedTest(
            n, diff, float(outcome.statistic), p, better, bool(significant)
        )
    return tests


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


# --- report files -----------------------------------------------------------------------------

REPORT_FILES = ("subjects.csv", "summary.json", "parcellation_dice.csv")


def check_report_target(out_dir: Path, *, overwrite: bool) -> None:
    """Fail before any work if the report would replace files without --overwrite."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if overwrite or not out_dir.exists():
        return
    existing = [out_dir / n for n in REPORT_FILES if (out_dir / n).exists()]
    existing += sorted((out_dir / "figures").glob("*.png"))
    if existing:
        raise OutputError(f"{existing[0]}: already exists (use --overwrite to replace it)")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return buffer.getvalue()


def _write_text(path: Path, text: str, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_report(
    evaluation: Evaluation,
    out_dir: Path,
    *,
    overwrite: bool = False,
    label_names: dict[int, str] | None = None,
) -> list[Path]:
    """subjects.csv, summary.json, parcellation_dice.csv (with weights) and figures/*.png.

    Returns the paths written. Every file goes through a temporary name and a rename.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "figures").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the report folder ({exc.strerror})") from exc
    written: list[Path] = []

    detail_keys = sorted({k for r in evaluation.results for k in r.details}, key=_detail_order)
    keys = [m.key for m in evaluation.metrics]
    header = ["method", "subject", "reference", "prediction", *keys, *detail_keys, "error"]
    rows = [
        [r.method, r.subject, r.ref, r.pred]
        + [r.values.get(k, math.nan) for k in keys]
        + [r.details.get(k, math.nan) for k in detail_keys]
        + [r.error or ""]
        for r in evaluation.results
    ]
    path = out_dir / "subjects.csv"
    _write_text(path, _csv_text(header, rows), overwrite)
    written.append(path)

    if any(r.dice_labels for r in evaluation.results):
        names = label_names or {}
        label_rows = [
            [r.method, r.subject, label, names.get(label, ""), dice]
            for r in evaluation.results
            for label, dice in sorted(r.dice_labels.items())
        ]
        path = out_dir / "parcellation_dice.csv"
        _write_text(
            path, _csv_text(["method", "subject", "label", "name", "dice"], label_rows), overwrite
        )
        written.append(path)

    path = out_dir / "summary.json"
    _write_text(path, json.dumps(summary_dict(evaluation), indent=2) + "\n", overwrite)
    written.append(path)

    written += write_figures(evaluation, out_dir / "figures", overwrite=overwrite)
    # an earlier report's files that this one does not replace would mix two runs: remove them
    stale = [out_dir / n for n in REPORT_FILES] + sorted((out_dir / "figures").glob("*.png"))
    for path in stale:
        if path not in written:
            path.unlink(missing_ok=True)
    return written


def _detail_order(key: str) -> tuple[str, int]:
    stem, _, number = key.rpartition("_")
    return (stem, int(number) if number.isdigit() else 0)


def summary_dict(evaluation: Evaluation) -> dict[str, Any]:
    """The JSON summary: settings, counts, per-method statistics, the paired tests, notes."""
    methods = {}
    for name, folder in evaluation.methods.items():
        rows = [r for r in evaluation.results if r.method == name]
        methods[name] = {
            "folder": str(folder),
            "alpha": evaluation.alphas.get(name),  # set where the folder was split by alpha
            "pairs": len(rows),
            "evaluated": sum(1 for r in rows if not r.error),
            "errors": {r.subject: r.error for r in rows if r.error},
            "metrics": {
                k: {key: _finite_or_none(v) for key, v in asdict(s).items()}
                for k, s in evaluation.summary.get(name, {}).items()
            },
        }
    comparison = None
    if evaluation.comparison:
        first, second = list(evaluation.methods)
        comparison = {
            "first": first,
            "second": second,
            "significance_level": SIGNIFICANCE_LEVEL,
            "metrics": {
                k: {key: _finite_or_none(v) for key, v in asdict(t).items()}
                for k, t in evaluation.comparison.items()
            },
        }
    return {
        "mrisr_version": __version__,
        "reference": str(evaluation.ref_dir),
        "metrics": [
            {"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better}
            for m in evaluation.metrics
        ],
        "settings": evaluation.settings,
        "methods": methods,
        "comparison": comparison,
        "notes": evaluation.notes,
    }


# --- figures ----------------------------------------------------------------------------------


def _save_figure(figure: Any, path: Path, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def write_figures(evaluation: Evaluation, folder: Path, *, overwrite: bool) -> list[Path]:
    """``boxplots.png`` (one panel per metric, methods side by side) and, for the first
    subjects, ``slices_<subject>.png`` (reference, prediction, |difference| per method).

    Matplotlib's object API (no pyplot): no global state, no GUI backend, safe in workers.
    """
    written: list[Path] = []
    path = folder / "boxplots.png"
    figure = _boxplot_figure(evaluation)
    if figure is not None:
        _save_figure(figure, path, overwrite)
        written.append(path)
    subjects = sorted({r.subject for r in evaluation.results if r.preview is not None})
    for subject in subjects:
        rows = [r for r in evaluation.results if r.subject == subject and r.preview is not None]
        path = folder / f"slices_{_safe(subject)}.png"
        _save_figure(_slice_figure(subject, rows), path, overwrite)
        written.append(path)
    return written


def _boxplot_figure(evaluation: Evaluation) -> Any:
    from matplotlib.figure import Figure

    panels = []
    for metric in evaluation.metrics:
        data = []
        for name in evaluation.methods:
            values = [
                r.values.get(metric.key, math.nan)
                for r in evaluation.results
                if r.method == name and not r.error
            ]
            data.append([v for v in values if math.isfinite(v)])
        if any(data):
            panels.append((metric, data))
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    width = max(2.6, 1.1 + 1.2 * len(evaluation.methods))
    figure = Figure(figsize=(width * columns, 3.4 * rows), layout="constrained")
    rng = np.random.default_rng(0)
    names = list(evaluation.methods)
    for index, (metric, data) in enumerate(panels):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.boxplot([d if d else [math.nan] for d in data], showmeans=True, showfliers=False)
        axis.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        for i, values in enumerate(data, start=1):
            axis.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=8, alpha=0.6)
        title = f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)"
        test = evaluation.comparison.get(metric.key)
        if test and math.isfinite(test.p):
            title += f"\npaired t-test p = {test.p:.3g} (n = {test.n})"
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.grid(axis="y", alpha=0.3)
    return figure


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _slice_figure(subject: str, results: list[PairResult]) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.3 * len(results)), layout="constrained")
    axes = figure.subplots(len(results), 3, squeeze=False)
    diffs = [np.abs(r.preview["ref"] - r.preview["pred"]) for r in results if r.preview]
    top = max(float(np.percentile(d, 99.9)) for d in diffs) or 1e-6  # one scale for all rows
    for row, result, diff in zip(axes, results, diffs, strict=True):
        assert result.preview is not None
        ref, pred = result.preview["ref"], result.preview["pred"]
        psnr, ssim = result.values.get("psnr", math.nan), result.values.get("ssim", math.nan)
        for axis, image, title, kwargs in (
            (row[0], ref, "reference", {"cmap": "gray", "vmin": 0, "vmax": 1}),
            (
                row[1],
                pred,
                f"{result.method}: PSNR {psnr:.2f}, SSIM {ssim:.4f}",
                {"cmap": "gray", "vmin": 0, "vmax": 1},
            ),
            (row[2], diff, "|reference - prediction|", {"cmap": "magma", "vmin": 0, "vmax": top}),
        ):
            shown = axis.imshow(image.T, origin="lower", **kwargs)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        figure.colorbar(shown, ax=row[2], fraction=0.046)
    figure.suptitle(
        f"{subject}: axial slice, intensities scaled by the reference's min-max", fontsize=10
    )
    return figure
