"""Which split (train, val, eval, test) each prepared scan goes to.

The split is by subject and a pure function of the subjects, the shares and the seed, so that a
dataset prepared again is split as before and an extended one keeps every earlier assignment.
Scans of one subject, and identical scans under two names or encodings, share a split: a copy
of a held-out scan in train would flatter every figure measured on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mrisr_cli.errors import InputError

SPLITS: tuple[str, ...] = ("train", "val", "eval", "test")

DEFAULT_RATIOS: tuple[float, float, float, float] = (0.7, 0.1, 0.1, 0.1)


def parse_ratios(text: str) -> tuple[float, float, float, float]:
    """'0.7,0.1,0.1,0.1' -> four non-negative numbers with a positive train share."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values) or values[0] <= 0:
        raise InputError(
            f"--split takes four shares train,val,eval,test like 0.7,0.1,0.1,0.1, got {text!r}"
        )
    return values  # type: ignore[return-value]


def split_counts(n: int, ratios: Sequence[float]) -> tuple[int, int, int, int]:
    """Group counts per split: held-out splits get round(share / sum of shares x n) in floating
    point, train gets the rest (kept exactly as in earlier versions, so that a dataset prepared
    again into a new folder is split as before: an exact half can round either way, 5 subjects
    give 2/1/1/1 at 0.7,0.1,0.1,0.1, whose sum is 0.9999999999999999, and 4/1/0/0 at 7,1,1,1).

    This gives the paper's 780/111/111/111 for 1113 subjects at 0.7,0.1,0.1,0.1. With few
    subjects, train and then val each keep at least one (taken from the largest other split),
    because training needs both: with two or more subjects val gets one even at share 0.
    """
    total = float(sum(ratios))
    counts = [0] + [round(n * r / total) for r in ratios[1:]]
    counts[0] = n - sum(counts[1:])

    def take_from_largest(candidates: list[int]) -> None:
        counts[max(candidates, key=counts.__getitem__)] -= 1

    while counts[0] < min(n, 1):
        take_from_largest([1, 2, 3])
        counts[0] += 1
    if n >= 2 and counts[1] == 0:
        take_from_largest([2, 3, 0])
        counts[1] += 1
    return counts[0], counts[1], counts[2], counts[3]


def assign_splits(
    subjects: Sequence[str],
    ratios: Sequence[float],
    seed: int,
    kept: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Subject -> split for new subjects, the same for the same subjects, ratios, seed and
    ``kept`` (split -> subjects already assigned there, which keep their split).

    The new subjects, in the seed's random order, fill each split up to its :func:`split_counts`
    share of all subjects (largest shortfall first); with none kept this is a fresh split.
    """
    unique = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(unique))
    have = [int((kept or {}).get(name, 0)) for name in SPLITS]
    target = split_counts(len(unique) + sum(have), ratios)
    counts = [0, 0, 0, 0]
    for _ in unique:  # no split over its target can take one: the kept ones stay where they are
        gap = [target[i] - have[i] - counts[i] for i in range(4)]
        counts[max(range(4), key=lambda i: (gap[i], -i))] += 1
    result: dict[str, str] = {}
    position = 0
    for name, count in zip(SPLITS, counts, strict=True):
        for index in order[position : position + count]:
            result[unique[int(index)]] = name
        position += count
    return result


def content_keys(record: Mapping[str, Any]) -> set[str]:
    """What makes two records one scan, whatever its file's name or encoding: the same file
    (source sha256), the same voxels (``voxels_sha256``; not in records of earlier versions)
    or the same prepared ``hr.npy`` (in every record; ``hr_sha256`` in a ``former`` entry)."""
    files = record.get("files")
    hr = files.get("hr") if isinstance(files, dict) else None
    shas = {
        "sha256:": record.get("source_sha256"),
        "voxels:": record.get("voxels_sha256"),
        "hr:": hr.get("sha256") if isinstance(hr, dict) else record.get("hr_sha256"),
    }
    return {kind + sha for kind, sha in shas.items() if isinstance(sha, str) and sha}


def split_groups(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Record id -> group that shares a split: the scans of one subject, and identical scans
    (:func:`content_keys`: one scan copied under two names, or saved again as ``.nii`` beside
    its ``.nii.gz``) that would otherwise leak a held-out scan into train. A group is named by
    its first subject."""
    linked = link_records(records, lambda r: {"subject:" + r["subject"], *content_keys(r)})
    name: dict[str, str] = {}
    for record in sorted(records, key=lambda r: r["subject"]):
        name.setdefault(linked[record["id"]], record["subject"])
    return {r["id"]: name[linked[r["id"]]] for r in records}


def link_records(
    records: Sequence[Mapping[str, Any]], keys_of: Callable[[Mapping[str, Any]], set[str]]
) -> dict[str, str]:
    """Record id -> a name shared by every record linked to it through a chain of common keys
    (``a.nii.gz`` and its copy ``b.nii.gz`` by file, ``b.nii.gz`` and ``b.nii`` by voxels)."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node

    for record in records:
        for key in keys_of(record):
            a, b = root("id:" + record["id"]), root(key)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {r["id"]: root("id:" + r["id"]) for r in records}
