"""`mrisr prepare`: a folder of T1 scans -> a training set that the patch sampler memory-maps.

For each scan: read and check it, reorient to RAS+ canonical axes, resample to isotropic voxels
with a cubic B-spline (SimpleITK, as the paper resampled HCP to 1 mm), optional N4, then the
k-space degradation makes the network input on the same grid. Both volumes are z-scored with the
*degraded* volume's foreground statistics, because at inference `upsample` can only compute them
from its (low-resolution) input: training on the same mapping keeps the two consistent.

Layout of OUT_DIR (plain .npy so that training memory-maps them and never decodes NIfTI)::

    manifest.json                  settings, split, per-file sha256, bad inputs
    subjects/<id>/hr.npy           float16 z-scores, canonical axes, isotropic grid
    subjects/<id>/lr.npy           float16, the degraded volume on the same grid
    subjects/<id>/mask.npy         uint8 foreground of the high-resolution volume
    subjects/<id>/centres.npy      int16 (N, 3) foreground voxels on a stride-4 grid
    subjects/<id>/subject.json     written last: its presence marks the subject done; it also
                                   gets the subject's split, so a lost manifest loses none

float16 halves disk and page cache; on z-scores its rounding error (~5e-4 relative) is far below
the L1 errors a network reaches. Subjects run in separate processes; a failed scan is reported
and skipped. OUT must be new, empty or a dataset made with the same settings, split and seed: a
rerun then skips the subjects already done (and intact), and the subjects already split keep
their split, so that extending a dataset never moves a held-out subject into train.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from mrisr_cli.degradation import DegradationConfig, degrade_volume
from mrisr_cli.errors import InputError, MrisrError, OutputError, WeightsError
from mrisr_cli.intensity import foreground_mask, foreground_stats
from mrisr_cli.manifest import MANIFEST_FORMAT, MANIFEST_NAME, save_manifest
from mrisr_cli.splits import (
    DEFAULT_RATIOS,
    SPLITS,
    assign_splits,
    content_keys,
    link_records,
    split_groups,
)
from mrisr_cli.volumes import (
    atomic_path,
    canonical_reorientation,
    check_not_label_map,
    check_t1_name,
    image_files,
    load_volume,
    obliquity_degrees,
    read_geometry,
    strip_suffix,
)
from mrisr_cli.weights import sha256_of
from mrisr_cli.workers import WorkerPool

CENTRE_STRIDE = 4
MIN_EXTENT_MM = 64.0  # a whole brain spans ~140 mm; less than a patch is no brain scan
MAX_SPACING_RATIO = 1.5  # voxels coarser than 1.5 x --spacing are no high-resolution truth
MAX_OBLIQUITY_DEGREES = 30.0
ARRAY_NAMES: tuple[str, ...] = ("hr", "lr", "mask", "centres")
FLOAT16_LIMIT = 6e4  # largest z-score float16 holds (65504), with a margin


@dataclass(frozen=True)
class PrepareOptions:
    """What defines a prepared dataset: the degradation (with spacing and N4) and the split."""

    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    ratios: tuple[float, float, float, float] = DEFAULT_RATIOS
    seed: int = 0
    min_extent_mm: float = MIN_EXTENT_MM


@dataclass(frozen=True)
class Scan:
    """One input file and the identifiers it gets in the dataset."""

    path: Path
    id: str  # unique folder name
    subject: str  # BIDS subject (sessions of one person share a split)


@dataclass
class SubjectOutcome:
    """What happened to one scan: done, skipped (already done) or failed (with the reason)."""

    scan: Scan
    status: str
    message: str = ""
    record: dict[str, Any] | None = None


# --- finding scans --------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scan"


def find_scans(src_dir: Path) -> list[Scan]:
    """Every image file under ``src_dir`` (recursively), with unique ids; none is an error."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise InputError(f"{src_dir}: not a folder")
    paths = image_files(src_dir, recursive=True)
    if not paths:
        raise InputError(f"{src_dir}: no NIfTI or MGH images found (.nii, .nii.gz, .mgz, .mgh)")
    stems = [_safe_name(strip_suffix(p.name)) for p in paths]
    ids = []
    for path, stem in zip(paths, stems, strict=True):
        if stems.count(stem) > 1:  # same name in several folders: prefix the folders
            stem = _safe_name(str(path.relative_to(src_dir).parent / stem).replace("/", "_"))
        ids.append(stem)
    # still shared (x.nii.gz beside x.mgz, or names that _safe_name maps alike): number them
    # in path order, which is stable from one run to the next
    taken = set(ids)
    for index, scan_id in enumerate(ids):
        if ids.count(scan_id) > 1 and ids.index(scan_id) != index:
            number = 2
            while f"{scan_id}-{number}" in taken:
                number += 1
            ids[index] = f"{scan_id}-{number}"
            taken.add(ids[index])
    relatives = [path.relative_to(src_dir) for path in paths]
    freesurfer = freesurfer_mri_folders(relatives)
    return [
        Scan(path=path, id=scan_id, subject=subject_of(relative, freesurfer) or scan_id)
        for path, relative, scan_id in zip(paths, relatives, ids, strict=True)
    ]


BIDS_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")  # the subject entity of a BIDS name or folder

#: Volumes that FreeSurfer's recon-all writes into SUBJECT/mri/: one of them marks such a folder.
FREESURFER_VOLUMES = frozenset(
    {"orig.mgz", "rawavg.mgz", "nu.mgz", "T1.mgz", "norm.mgz", "brainmask.mgz", "brain.mgz"}
    | {"aseg.mgz", "aparc+aseg.mgz", "wm.mgz"}
)


def freesurfer_mri_folders(relatives: Sequence[Path]) -> frozenset[Path]:
    """The ``mri/`` folders among the scans' paths that hold one of FreeSurfer's own volumes:
    a dataset that merely keeps its scans in a folder named ``mri`` is not one person."""
    return frozenset(
        p.parent for p in relatives if p.name in FREESURFER_VOLUMES and p.parent.name == "mri"
    )


def subject_of(relative: Path, freesurfer: frozenset[Path] = frozenset()) -> str | None:
    """The person a scan belongs to, from its path below the source folder, so that all their
    scans share a split: a BIDS ``sub-XX`` in the file name or a folder name, else the folder
    holding a FreeSurfer ``mri/`` folder (one of ``freesurfer``): ``bert/mri/T1.mgz``,
    ``bert/mri/orig/001.mgz`` and a ``bert/mri/T1.nii.gz`` exported beside them are one
    person's. None: the scan is its own subject."""
    match = BIDS_SUBJECT.search(relative.name)
    if match:
        return match.group(0)
    folders = relative.parts[:-1]
    for folder in reversed(folders):
        if BIDS_SUBJECT.fullmatch(folder):
            return folder
    if "mri" in folders[1:]:
        below = len(folders) - 1 - folders[::-1].index("mri")
        if Path(*folders[: below + 1]) in freesurfer:
            return "/".join(folders[:below])
    return None


# --- per-scan processing --------------------------------------------------------------------


def check_training_scan(
    data: np.ndarray,
    affine: np.ndarray,
    spacing_mm: float,
    what: str,
    *,
    min_extent_mm: float = MIN_EXTENT_MM,
) -> None:
    """Refuse files that cannot be high-resolution brain ground truth.

    A T2 or FLAIR image cannot be told from a T1 by its header; what can be caught here is a
    label map or mask, a coarse acquisition, a partial field of view and a heavily oblique grid.
    """
    check_not_label_map(data, what)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if zooms.max() > spacing_mm * MAX_SPACING_RATIO:
        raise InputError(
            f"{what}: voxels of {zooms.max():.2f} mm are too coarse to serve as high-resolution "
            f"ground truth at --spacing {spacing_mm:g} (at most {spacing_mm * MAX_SPACING_RATIO:g})"
        )
    check_extent(data.shape, affine, what, min_extent_mm=min_extent_mm)
    oblique = obliquity_degrees(affine)
    if oblique > MAX_OBLIQUITY_DEGREES:
        raise InputError(f"{what}: grid is {oblique:.0f} degrees oblique; reslice it first")


def check_extent(
    shape: Sequence[int], affine: np.ndarray, what: str, *, min_extent_mm: float = MIN_EXTENT_MM
) -> None:
    """Refuse a field of view under ``min_extent_mm`` along some axis (a slab, a crop)."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    extent = np.asarray(shape[:3]) * zooms
    if extent.min() < min_extent_mm:
        raise InputError(
            f"{what}: field of view {' x '.join(f'{e:.0f}' for e in extent)} mm is too small "
            f"for a brain scan (at least {min_extent_mm:g} mm along every axis)"
        )


def _check_source_extent(path: Path, min_extent_mm: float) -> None:
    """:func:`check_extent` from the header alone: a scan prepared by an earlier run is held
    to this run's ``--min-extent`` too (it is not part of the settings that redo a scan)."""
    shape, affine = read_geometry(path)
    check_extent(shape, affine, str(path), min_extent_mm=min_extent_mm)


def resample_isotropic(
    data: np.ndarray, affine: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline resampling (SimpleITK) of a canonical volume onto ``spacing_mm`` voxels.

    Voxel 0 keeps its centre; the new affine is ``affine @ diag(spacing / zooms)``, the same
    convention `upsample` uses when it moves a coarse input onto the model grid.
    """
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.allclose(zooms, spacing_mm, rtol=1e-3, atol=0):
        return data, affine
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), np.float32))
    image.SetSpacing(tuple(float(z) for z in zooms))
    size = [max(2, round(n * z / spacing_mm)) for n, z in zip(data.shape, zooms, strict=True)]
    out = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkBSpline,
        image.GetOrigin(),
        (float(spacing_mm),) * 3,
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    result = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    if data.min() >= 0:  # cubic splines overshoot below zero at sharp edges
        result = np.maximum(result, 0.0)
    new_affine = affine @ np.diag([*(spacing_mm / zooms), 1.0])
    return np.ascontiguousarray(result, dtype=np.float32), new_affine


def _save_array(path: Path, array: np.ndarray) -> str:
    """Write one .npy atomically; return its sha256."""
    with atomic_path(path, overwrite=True) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)
    return sha256_of(path)


def write_subject_arrays(
    folder: Path, subject_id: str, hr_z: np.ndarray, lr_z: np.ndarray, mask: np.ndarray
) -> dict[str, dict[str, str]]:
    """The arrays training reads (float16 z-scores, uint8 mask, the patch centres: foreground
    voxels on a stride-:data:`CENTRE_STRIDE` grid); return their manifest entries."""
    s = CENTRE_STRIDE
    arrays = {
        "hr": hr_z.astype(np.float16),
        "lr": lr_z.astype(np.float16),
        "mask": mask.astype(np.uint8),
        "centres": (np.argwhere(mask[::s, ::s, ::s]) * s).astype(np.int16),
    }
    return {
        name: {
            "path": f"subjects/{subject_id}/{name}.npy",
            "sha256": _save_array(folder / f"{name}.npy", array),
        }
        for name, array in arrays.items()
    }


def _settings(options: PrepareOptions) -> str:
    return options.degradation.to_json()


def prepare_subject(scan: Scan, out_dir: Path, options: PrepareOptions) -> SubjectOutcome:
    """Process one scan into ``out_dir/subjects/<id>``; user errors become a failed outcome."""
    folder = Path(out_dir) / "subjects" / scan.id
    record_path = folder / "subject.json"
    try:
        check_t1_name(scan.path)
    except InputError as exc:
        return SubjectOutcome(scan, "failed", str(exc))
    try:
        source_sha = sha256_of(scan.path)
    except OSError as exc:
        return SubjectOutcome(scan, "failed", f"{scan.path}: cannot be read ({exc.strerror})")
    damage, split = None, None
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = {}
        record = record if isinstance(record, dict) else {}
        split = record.get("split")
        same = (record.get("settings"), record.get("source_sha256"))
        if same == (_settings(options), source_sha):
            damage = _array_damage(folder, record)
            if damage is None:
                try:
                    _check_source_extent(scan.path, options.min_extent_mm)
                except InputError as exc:
                    return SubjectOutcome(scan, "failed", str(exc))
                # the subject comes from the path (subject_of), which an earlier version read
                # otherwise: this run's grouping applies to subjects done before it too; and the
                # source folder may have moved: warnings name where the scan is now
                record = {**record, "subject": scan.subject, "source": str(scan.path)}
                return SubjectOutcome(scan, "skipped", "already prepared", record)
    try:
        record = _process(scan, folder, options, source_sha)
    except MrisrError as exc:
        return SubjectOutcome(scan, "failed", str(exc))
    except (RuntimeError, ValueError, OSError, MemoryError) as exc:  # ITK/ANTs, numpy, disk
        text = str(exc).strip().splitlines()
        detail = text[0][:200] if text else type(exc).__name__
        return SubjectOutcome(scan, "failed", f"{scan.path}: {type(exc).__name__}: {detail}")
    if split is not None:  # redone: it keeps the split its earlier files had
        record["split"] = split
    return SubjectOutcome(scan, "done", f"redone: {damage}" if damage else "", record)


def _array_damage(folder: Path, record: dict[str, Any]) -> str | None:
    """Why a done subject's arrays cannot be trained on (None: they can).

    Training memory-maps them and refuses a truncated or foreign file, so a rerun must not count
    such a subject as done. Damage that keeps the size (zeroed or overwritten bytes) only the
    sha256 that subject.json records shows; hashing costs little next to preparing the subject
    again. A record without it (an older version's) gets the header check alone.
    """
    shape = tuple(record.get("shape") or ())
    dtypes = (np.float16, np.float16, np.uint8, np.int16)
    files = record.get("files")
    for name, dtype in zip(ARRAY_NAMES, dtypes, strict=True):
        path = folder / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return f"subjects/{folder.name}/{name}.npy was missing or unreadable"
        fits = (
            (array.ndim == 2 and array.shape[1] == 3) if name == "centres" else array.shape == shape
        )
        if array.dtype != dtype or not fits:
            return (
                f"subjects/{folder.name}/{name}.npy held {array.dtype} {array.shape}, "
                f"not what subject.json records"
            )
        del array
        entry = files.get(name) if isinstance(files, dict) else None
        recorded = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(recorded, str):
            continue
        try:
            matches = sha256_of(path) == recorded
        except OSError:
            return f"subjects/{folder.name}/{name}.npy was missing or unreadable"
        if not matches:
            return (
                f"subjects/{folder.name}/{name}.npy did not match the sha256 that subject.json "
                "records (damaged or changed)"
            )
    return None


def voxels_sha256(data: np.ndarray) -> str:
    """sha256 of a scan's voxels (float32, canonical axes) and shape: the same for a copy saved
    in another format or encoding, whose file sha256 differs. The affine is left out: a copy
    whose header was edited (another origin, say) is still the same scan, as leaky as any."""
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(memoryview(np.ascontiguousarray(data, dtype=np.float32)).cast("B"))
    return digest.hexdigest()


def _process(scan: Scan, folder: Path, options: PrepareOptions, source_sha: str) -> dict:
    config = options.degradation
    volume = load_volume(scan.path)
    check_training_scan(
        volume.data,
        volume.affine,
        config.spacing_mm,
        str(scan.path),
        min_extent_mm=options.min_extent_mm,
    )
    reo = canonical_reorientation(volume.affine, volume.data.shape)
    canonical = reo.apply(volume.data)
    voxels_sha = voxels_sha256(canonical)
    hr, affine = resample_isotropic(canonical, reo.canonical_affine, config.spacing_mm)
    if config.n4:
        from mrisr_cli.n4 import n4_correct

        hr = n4_correct(hr, (config.spacing_mm,) * 3)
    lr = degrade_volume(hr, config, affine=affine)
    stats = foreground_stats(lr, foreground_mask(lr))
    mask = foreground_mask(hr)
    if not mask.any():
        raise InputError(f"{scan.path}: no foreground found")
    hr_z, lr_z = stats.normalise(hr), stats.normalise(lr)
    if max(float(np.abs(hr_z).max()), float(np.abs(lr_z).max())) > FLOAT16_LIMIT:
        raise InputError(f"{scan.path}: intensities span too many standard deviations to store")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "subject.json").unlink(missing_ok=True)  # not done until rewritten
    record = {
        "id": scan.id,
        "subject": scan.subject,
        "source": str(scan.path),
        "source_sha256": source_sha,
        "voxels_sha256": voxels_sha,
        "settings": _settings(options),
        "shape": [int(n) for n in hr.shape],
        "affine": np.asarray(affine, dtype=float).round(6).tolist(),
        "intensity": {"mean": stats.mean, "std": stats.std},
        "foreground_voxels": int(mask.sum()),
        "files": write_subject_arrays(folder, scan.id, hr_z, lr_z, mask),
    }
    with atomic_path(folder / "subject.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


# --- split and manifest ---------------------------------------------------------------------


def write_manifest(
    out_dir: Path,
    options: PrepareOptions,
    outcomes: Sequence[SubjectOutcome],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` (atomically) from the outcomes; return it, with ``"run"``.

    Groups (:func:`split_groups`) that hold a subject or scan of the ``previous`` manifest keep
    its split; only new groups are assigned. ``"run"`` (returned, not written: a rerun must
    write the same file) says how many scans kept their split and how many were newly assigned,
    and carries the warnings for the user.
    """
    good = sorted((o for o in outcomes if o.record is not None), key=lambda o: o.scan.id)
    records = [dict(o.record or {}) for o in good]
    group_of = split_groups(records)
    members: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        members.setdefault(group_of[record["id"]], []).append(record)
    old = [
        r
        for r in [*(previous or {}).get("subjects", []), *(previous or {}).get("former", [])]
        if isinstance(r, dict)
    ]
    if previous is None:  # manifest.json lost: each subject.json recalls its split
        old = [r for r in records if r.get("split") in SPLITS]
    old_by_id = {r.get("id"): r.get("split") for r in old}
    warnings: list[str] = []
    split_of: dict[str, str] = {}  # record id -> split
    kept: dict[str, int] = {}
    for group_records in members.values():
        names = {r["subject"] for r in group_records}
        keys = set().union(*(content_keys(r) for r in group_records))
        matches = {
            r.get("split") for r in old if r.get("subject") in names or content_keys(r) & keys
        }
        before = [name for name in SPLITS if name in matches]
        if not before:
            continue
        kept[before[0]] = kept.get(before[0], 0) + 1
        for record in group_records:  # where an earlier run split a group, each keeps its own
            own = old_by_id.get(record["id"])
            split_of[record["id"]] = own if own in before else before[0]
        if len(before) > 1:
            warnings.append(
                f"{', '.join(r['source'] for r in group_records)}: the same subject or identical "
                f"scans were put in different splits ({', '.join(before)}) by an earlier "
                "preparation and keep them; remove the copies from the source folder, or "
                "prepare into a new folder, to keep held-out scans out of train"
            )
    new_groups = [g for g in members if not any(r["id"] in split_of for r in members[g])]
    new_splits = assign_splits(new_groups, options.ratios, options.seed, kept)
    for group in new_groups:
        for record in members[group]:
            split_of[record["id"]] = new_splits[group]
    scan_of = link_records(records, content_keys)
    by_scan: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_scan.setdefault(scan_of[record["id"]], []).append(record)
    for same in by_scan.values():
        if len(same) > 1 and len({split_of[r["id"]] for r in same}) == 1:
            warnings.append(
                f"{', '.join(r['source'] for r in same)}: identical files (same sha256 of the "
                f"file or of its voxels); kept together in {split_of[same[0]['id']]}; remove "
                "the copies unless they are meant to count twice"
            )
    subjects = []
    for record in records:
        record.pop("settings", None)
        record.pop("split_rule", None)  # the manifest holds it once, as "split"
        record["split"] = split_of[record["id"]]
        subjects.append(record)
    for outcome in good:
        if outcome.message.startswith("redone: "):
            warnings.append(f"{outcome.message.removeprefix('redone: ')}; prepared it again")
    failures = [
        {"source": str(o.scan.path), "error": o.message}
        for o in sorted(outcomes, key=lambda o: str(o.scan.path))
        if o.status == "failed"
    ]
    split = {"ratios": list(options.ratios), "seed": options.seed, "by": "subject"}
    # scans that left (moved away, failed, not fetched) keep their split for when they return
    names = {r["subject"] for r in records}
    here = set().union(*(content_keys(r) for r in records))
    former = sorted(
        (
            _former_entry(r)
            for r in old
            if r.get("subject") not in names and not content_keys(r) & here
        ),
        key=lambda r: str(r["id"]),
    )
    former = list({str(r["id"]): r for r in former}.values())
    manifest = save_manifest(
        out_dir,
        options.degradation,
        split,
        subjects,
        failures,
        former,
        min_extent_mm=options.min_extent_mm,
    )
    _record_splits(out_dir, subjects, {"ratios": list(options.ratios), "seed": options.seed})
    empty = _empty_splits_warning(manifest["counts"], options.ratios, len(members))
    if empty:
        warnings.append(empty)
    new_ids = {r["id"] for g in new_groups for r in members[g]}
    manifest["run"] = {
        "kept": len(records) - len(new_ids),
        "assigned": len(new_ids),
        "warnings": warnings,
    }
    return manifest


def _empty_splits_warning(
    counts: Mapping[str, int], ratios: Sequence[float], groups: int
) -> str | None:
    """One line when a split came out empty (too few subjects, :func:`split_counts`), said at
    prepare time rather than by `mrisr train` later: an empty val always (training then keeps
    no best weights), an empty eval or test only where its share asked for scans."""
    held_out = [name for name, share in zip(SPLITS[2:], ratios[2:], strict=True) if share > 0]
    missing = [name for name in held_out if counts.get(name, 0) == 0]
    subjects = f"{groups} subject{'' if groups == 1 else 's'}"
    advice = "add scans of more subjects to the source folder and rerun"
    if counts.get("val", 0) == 0:
        also = f"; {' and '.join(missing)} empty too" if missing else ""
        return (
            f"val is empty ({subjects} in all{also}): `mrisr train` will have nothing to "
            f"validate on and write no best weights; {advice}"
        )
    if missing:
        return (
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} empty ({subjects} "
            f"in all, too few for the --split shares): no scan is held out there; {advice}"
        )
    return None


def _former_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the ``former`` list keeps of a subject that left: enough to give its split back to
    it, or to a copy of it (:func:`content_keys`), when it returns."""
    entry = {key: record.get(key) for key in ("id", "subject", "source_sha256", "split")}
    for key in sorted(content_keys(record)):
        kind, sha = key.split(":", 1)
        if kind in ("voxels", "hr"):
            entry[f"{kind}_sha256"] = sha
    return entry


def _record_splits(out_dir: Path, subjects: Sequence[dict[str, Any]], rule: dict[str, Any]) -> None:
    """Write each subject's split, and the ``rule`` (shares and seed) it was made by, into its
    ``subject.json`` too, so that a lost or deleted ``manifest.json`` can neither re-split the
    dataset (a held-out scan landing in train) nor let another rule extend it. Its ``source``
    follows a source folder that moved."""
    for subject in subjects:
        path = Path(out_dir) / "subjects" / str(subject["id"]) / "subject.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the manifest still holds it; the next run redoes this subject
        wanted = {"split": subject["split"], "split_rule": rule, "source": subject["source"]}
        if not isinstance(record, dict) or all(record.get(k) == v for k, v in wanted.items()):
            continue
        record.update(wanted)
        with atomic_path(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _option_text(key: str, value: Any) -> str:
    """A setting as the `prepare` option that sets it (``factor 2`` -> ``--factor 2``)."""
    if key == "n4":
        return "--n4" if value else "--no-n4"
    if key == "window":
        return f"--window {','.join(_exact_text(v) for v in value)}"
    if isinstance(value, list | tuple):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    names = {"spacing_mm": "--spacing", "factor": "--factor", "axes": "--axes"}
    return f"{names.get(key, '--' + key.replace('_', '-'))} {value}"


def check_output_folder(
    src_dir: Path, out_dir: Path, options: PrepareOptions
) -> dict[str, Any] | None:
    """Refuse an OUT that a run would damage or mix up; return its manifest if it has one.

    OUT may be new, empty (hidden files aside), a run interrupted before its manifest (only
    ``subjects/``, of the same settings), or a dataset of the same settings, split and seed:
    anything else would be silently rebuilt, overwritten or re-split.
    """
    out_dir, advice = Path(out_dir), "choose another (new or empty) OUT folder"
    src, out = Path(src_dir).resolve(), out_dir.resolve()
    if out == src or src in out.parents:
        raise OutputError(f"{out_dir}: is the source folder or inside it; {advice}")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file, not a folder; {advice}")
    if not out_dir.is_dir():
        return None
    try:
        entries = sorted(e.name for e in out_dir.iterdir() if not e.name.startswith("."))
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot be read ({exc.strerror})") from exc
    ours = json.loads(options.degradation.to_json())
    if MANIFEST_NAME not in entries:
        if entries not in ([], ["subjects"]):
            raise OutputError(f"{out_dir}: is not empty and holds no mrisr dataset; {advice}")
        others, rules = set(), set()
        for record_path in (out_dir / "subjects").glob("*/subject.json"):
            try:
                record = json.loads(record_path.read_text())
                if record["settings"] != _settings(options):
                    others.add(record["settings"])
                rule = record.get("split_rule")
                if rule is not None:
                    rules.add((tuple(float(r) for r in rule["ratios"]), int(rule["seed"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: that subject is redone anyway
        if others:
            try:
                changes = _changes(json.loads(sorted(others)[0]), ours)
            except (ValueError, TypeError, AttributeError):
                changes = ""
            raise OutputError(
                f"{out_dir}: holds subjects prepared with {changes or 'other settings'}; "
                f"rerun with those settings to complete it, or {advice}"
            )
        for ratios, seed in sorted(rules):  # its manifest.json deleted: subject.json recalls
            _check_split_rule(out_dir, ratios, seed, options, advice)
        return None
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError("not an mrisr dataset")
        theirs = json.loads(
            DegradationConfig.from_json(json.dumps(manifest["degradation"])).to_json()
        )
        split = manifest["split"]
        ratios, seed = tuple(float(r) for r in split["ratios"]), int(split["seed"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, WeightsError):
        raise OutputError(
            f"{out_dir}: holds a {MANIFEST_NAME} that is not an mrisr dataset; {advice}"
        ) from None
    if theirs != ours:
        changes = _changes(theirs, ours) or "other settings"
        raise OutputError(
            f"{out_dir}: holds a dataset prepared with {changes}; rerun with those settings to "
            f"extend it, or {advice}"
        )
    _check_split_rule(out_dir, ratios, seed, options, advice)
    return manifest


def _check_split_rule(
    out_dir: Path,
    ratios: tuple[float, ...],
    seed: int,
    options: PrepareOptions,
    advice: str,
) -> None:
    """Refuse extending a dataset split by other shares or another seed."""
    if ratios != tuple(options.ratios) or seed != options.seed:
        was = f"--split {','.join(f'{r:g}' for r in ratios)} --seed {seed}"
        now = f"--split {','.join(f'{r:g}' for r in options.ratios)} --seed {options.seed}"
        raise OutputError(
            f"{out_dir}: was split with {was}, not {now}: new subjects would follow another "
            f"rule than those already assigned; rerun with {was}, or {advice}"
        )


WINDOW_KEYS = ("unfilter_window", "filter_window", "window_power")  # one option: --window


def _with_window(settings: dict[str, Any]) -> dict[str, Any]:
    """The three window settings as one ``window`` setting (``--window U,F,P`` sets them)."""
    out = {k: v for k, v in settings.items() if k not in WINDOW_KEYS}
    if any(k in settings for k in WINDOW_KEYS):
        out["window"] = tuple(settings.get(k) for k in WINDOW_KEYS)
    return out


def _exact_text(value: Any) -> str:
    """A number as `--window` reads it back exactly: ``1.25``, ``1/3`` (not ``0.333333``)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if float(f"{value:g}") == value:
        return f"{value:g}"
    fraction = Fraction(value).limit_denominator(1000)
    return str(fraction) if float(fraction) == value else repr(float(value))


def _changes(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    """``--factor 2 (now --factor 3)`` for each setting that differs."""
    theirs, ours = _with_window(theirs), _with_window(ours)
    keys = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    return ", ".join(
        f"{_option_text(k, theirs.get(k))} (now {_option_text(k, ours.get(k))})" for k in keys
    )


# --- the parallel driver --------------------------------------------------------------------

OutcomeCallback = Callable[[SubjectOutcome], None]


def _worker_init(threads: int) -> None:
    """Each worker's share of the CPUs, for ITK and OpenMP/BLAS (torch is not needed here, so
    it is not imported: :func:`~mrisr_cli.threads.configure_threads` would cost seconds each)."""
    import SimpleITK as sitk

    from mrisr_cli.threads import THREAD_ENV_VARS

    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def prepare_dataset(
    src_dir: Path,
    out_dir: Path,
    options: PrepareOptions,
    *,
    jobs: int = 1,
    threads: int | None = None,
    on_outcome: OutcomeCallback | None = None,
    on_start: Callable[[int], None] | None = None,
    scans: Sequence[Scan] | None = None,
) -> dict[str, Any]:
    """Prepare every scan of ``src_dir`` (or the ``scans`` found there already) into
    ``out_dir`` with ``jobs`` processes; return the manifest with ``"run"`` (see
    :func:`write_manifest`). Failed scans are reported through ``on_outcome`` and listed in the
    manifest; an OUT that :func:`check_output_folder` refuses is an OutputError."""
    scans = list(scans) if scans is not None else find_scans(src_dir)
    out_dir = Path(out_dir)
    previous = check_output_folder(src_dir, out_dir, options)
    subjects_dir = out_dir / "subjects"
    created = [p for p in (subjects_dir, out_dir, *out_dir.parents) if not p.exists()]
    try:
        subjects_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from exc
    if on_start:
        on_start(len(scans))
    outcomes: list[SubjectOutcome] = []

    def finished(outcome: SubjectOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)

    jobs = max(1, min(jobs, len(scans)))
    try:
        if jobs == 1:
            for scan in scans:
                finished(prepare_subject(scan, out_dir, options))
        else:
            from mrisr_cli.threads import resolve_thread_count

            per_job = max(1, resolve_thread_count(threads) // jobs)
            with WorkerPool(jobs, initializer=_worker_init, initargs=(per_job,)) as pool:
                futures = {pool.submit(prepare_subject, s, out_dir, options): s for s in scans}
                try:
                    for future in as_completed(futures):
                        finished(future.result())
                except BrokenProcessPool as exc:
                    raise MrisrError(
                        "a worker process died (out of memory?); rerun with fewer --jobs "
                        "(subjects already finished are kept)"
                    ) from exc
    except BaseException:  # stopped (Ctrl-C) or failed: the folders it made and left empty go
        _remove_empty(created)
        raise
    if not any(o.record is not None for o in outcomes):
        _remove_empty(created)
        raise InputError(f"{src_dir}: none of the {len(scans)} images could be prepared")
    return write_manifest(out_dir, options, outcomes, previous)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders this run created (deepest first) while they are empty, so that a run
    that prepared nothing leaves no empty OUT behind to be mistaken for a dataset."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (a failed subject's files): keep it and the folders above


def default_jobs(threads: int | None = None) -> int:
    """Half the CPUs this job may use (each subject also runs threaded FFTs and ITK filters)."""
    from mrisr_cli.threads import resolve_thread_count

    return max(1, resolve_thread_count(threads) // 2)
