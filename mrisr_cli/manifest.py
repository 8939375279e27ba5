"""A prepared dataset's ``manifest.json``: written by `mrisr prepare`, read by training.

It holds the degradation settings, the split rule, each subject's split and the sha256 of each
of its arrays. Its fingerprint (what training reads, without paths) goes into the provenance of
the weights trained on it, so reading recomputes it: a hand-edited manifest is refused rather
than recorded as data it is not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.errors import InputError, WeightsError
from mrisr_cli.splits import SPLITS
from mrisr_cli.volumes import atomic_path, image_files
from mrisr_cli.weights import sha256_of

MANIFEST_NAME = "manifest.json"

MANIFEST_FORMAT = "mrisr-dataset"

MANIFEST_VERSION = 1


def dataset_fingerprint(degradation: str, subjects: Sequence[dict[str, Any]]) -> str:
    """sha256 of what training reads: settings, ids, splits and array hashes (not paths)."""
    content = {
        "degradation": degradation,
        "subjects": [
            [s["id"], s["split"], {k: v["sha256"] for k, v in sorted(s["files"].items())}]
            for s in subjects
        ],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def save_manifest(
    out_dir: Path,
    config: DegradationConfig,
    split: dict[str, Any],
    subjects: list[dict[str, Any]],
    failures: list[dict[str, str]],
    former: list[dict[str, Any]] | None = None,
    *,
    min_extent_mm: float | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` (atomically) for subjects whose split is already assigned;
    ``former``: the splits of subjects that left the dataset, kept for their return;
    ``min_extent_mm``: the smallest field of view the scans were accepted with."""
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "degradation": json.loads(config.to_json()),
        "spacing_mm": config.spacing_mm,
        "n4": config.n4,
        "split": split,
        "counts": {name: sum(s["split"] == name for s in subjects) for name in SPLITS},
        "fingerprint": dataset_fingerprint(config.to_json(), subjects),
        "subjects": subjects,
        "failures": failures,
    }
    if former:
        manifest["former"] = former
    if min_extent_mm is not None:
        manifest["min_extent_mm"] = min_extent_mm
    with atomic_path(Path(out_dir) / MANIFEST_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset as training reads it."""

    root: Path
    degradation: DegradationConfig
    subjects: tuple[dict[str, Any], ...]
    fingerprint: str
    sha256: str

    def split(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.subjects if s["split"] == name]


def load_manifest(data_dir: Path) -> Manifest:
    """Read ``DATA/manifest.json``; a missing or foreign manifest is one InputError line."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: no such data folder")
    if not path.is_file():
        if image_files(data_dir, recursive=True):  # the scans (or a BIDS tree), unprepared
            raise InputError(
                f"{data_dir}: holds images but no {MANIFEST_NAME}: prepare them first, "
                f"`mrisr prepare {data_dir} PREPARED_DIR`, then give --data PREPARED_DIR"
            )
        raise InputError(
            f"{data_dir}: no {MANIFEST_NAME}; make the data folder with "
            f"`mrisr prepare SRC_DIR {data_dir}` first"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError("not an mrisr dataset manifest")
        degradation = DegradationConfig.from_json(json.dumps(raw["degradation"]))
        subjects = tuple(raw["subjects"])
        fingerprint = str(raw["fingerprint"])
        # the settings as prepare wrote them (not re-serialised through DegradationConfig, whose
        # fields an earlier version's manifest may lack): that is what was fingerprinted
        recomputed = dataset_fingerprint(json.dumps(raw["degradation"], sort_keys=True), subjects)
    except (ValueError, KeyError, TypeError, AttributeError, WeightsError) as exc:
        raise InputError(f"{path}: not a readable mrisr manifest ({exc})") from exc
    if recomputed != fingerprint:  # a factor or a split edited: weights would record a lie
        raise InputError(
            f"{path} does not match its fingerprint (edited by hand?): prepare the dataset "
            "again with `mrisr prepare`"
        )
    return Manifest(data_dir, degradation, subjects, fingerprint, sha256_of(path))
