"""Which reference each predicted (or mask) file belongs to, decided by file name alone.

`mrisr evaluate` is given folders, not pairs: this module lists them, pairs files by their longest
common name stem, splits a folder of several ``upsample --alpha`` outputs into one method per
alpha and names the methods. It is apart from the scoring so that the pairing rules can be read
and tested without loading a volume.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mrisr_cli.errors import InputError
from mrisr_cli.volumes import image_files, strip_suffix


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
        below = image_files(folder, recursive=True)  # a BIDS tree: hr/sub-01/anat/...
        if below:
            raise InputError(
                f"{what} folder {folder}: no images directly in it ({len(below)} in subfolders, "
                f"e.g. {below[0].relative_to(folder).as_posix()}: evaluate reads one folder "
                "level; link or copy them into one folder)"
            )
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


_ENTITY = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+")


def bids_entities(name: str) -> frozenset[str]:
    """A BIDS name's entities (``sub-01``, ``ses-2``, ``space-MNI152``...) but ``desc-``, which
    says what a derivative is (``desc-preproc``, ``desc-brain``), not which scan or grid."""
    parts = strip_suffix(name).casefold().split("_")
    return frozenset(p for p in parts if _ENTITY.fullmatch(p) and not p.startswith("desc-"))


def match_masks(refs: Sequence[Path], masks: Sequence[Path]) -> Pairing:
    """:func:`match_files`, then, for the references still without a mask, BIDS derivative
    names: ``sub-01_desc-brain_mask`` (fMRIPrep's) has none of ``sub-01_T1w``'s name after
    ``sub-01``, yet it is that scan's mask. There a mask pairs with the one reference whose
    :func:`bids_entities` (``sub``, ``ses``, ``space``... all but ``desc``) are its own, and only
    where that is one mask for one reference; a name in another ``space-`` never pairs."""
    first = match_files(refs, masks)
    stems = [strip_suffix(r.name) for r in refs]
    unique = {s: r for s, r in zip(stems, refs, strict=True) if stems.count(s) == 1}
    paired = set(first.matches.values())
    refs_by_key: dict[frozenset[str], list[str]] = {}
    for stem, ref in unique.items():
        key = bids_entities(ref.name)
        if stem not in first.matches and any(e.startswith("sub-") for e in key):
            refs_by_key.setdefault(key, []).append(stem)
    masks_by_key: dict[frozenset[str], list[Path]] = {}
    for mask in masks:
        if mask not in paired:
            masks_by_key.setdefault(bids_entities(mask.name), []).append(mask)
    matches, notes = dict(first.matches), []
    for key, key_refs in refs_by_key.items():
        found = masks_by_key.get(key, [])
        if len(key_refs) == 1 and len(found) == 1:
            matches[key_refs[0]] = found[0]
        elif found:
            names = ", ".join(unique[s].name for s in key_refs)
            notes.append(f"{_names(found)} fit {names} alike (BIDS entities): left out")
    now = set(matches.values())
    return Pairing(
        matches,
        tuple(r.name for s, r in unique.items() if s not in matches),
        tuple(m.name for m in masks if m.name in first.unmatched and m not in now),
        (*first.ambiguous, *notes),
        (*first.ties, *notes),
    )


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
        mask_pairing = match_masks(refs, list_volumes(mask_dir, "mask"))
    return Plan(refs, methods, pairings, labels, alphas, mask_pairing)
