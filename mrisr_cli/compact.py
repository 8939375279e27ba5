"""A prepared dataset in a form small enough to send to a GPU node, and back.

`mrisr prepare` writes float16 HR and LR volumes, mask and centres, uncropped: about 50 MB per
1 mm subject. To train on a machine that is reached through a small transfer (a lent GPU, a
cluster with a quota), :func:`pack_dataset` keeps only what cannot be recomputed cheaply:

- the high-resolution volume, cropped to its foreground box (plus a margin) and quantised to
  8 bits between its minimum and maximum (step ~0.04 standard deviations; error std ~0.01, far
  below what any network reaches; most source scans were 8-bit to begin with);
- the subject's record and split from the manifest.

:func:`unpack_dataset` rebuilds a dataset that `mrisr train` reads: the LR volume is made again by
the same k-space degradation from the dequantised HR (in the scan's own units, then z-scored with
the same statistics), the mask and centres as `prepare` makes them, the split kept as it was.
Cropping moves the FFT's periodic boundary to the crop faces: voxels within a few of those faces
differ slightly from an uncropped degradation; the foreground is at least ``margin`` away.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mrisr_cli.degradation import DegradationConfig, degrade_volume
from mrisr_cli.errors import InputError
from mrisr_cli.intensity import IntensityStats, bounding_box, foreground_mask
from mrisr_cli.manifest import MANIFEST_NAME, load_manifest, save_manifest
from mrisr_cli.prepare import write_subject_arrays
from mrisr_cli.splits import SPLITS
from mrisr_cli.volumes import atomic_path

PACK_FORMAT = "mrisr-compact"
PACK_MANIFEST = "pack.json"
DEFAULT_MARGIN = 8


def foreground_box(
    mask: np.ndarray, margin: int, step: Sequence[int] = (1, 1, 1)
) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels, starting on a multiple of
    ``step`` (the degradation factors: the LR grid keeps its phase)."""
    if not mask.any():
        raise InputError("empty foreground: nothing to crop")
    box = bounding_box(mask, margin)
    return tuple(slice(b.start - b.start % f, b.stop) for b, f in zip(box, step, strict=True))


def degrade_zscores(
    hr_z: np.ndarray, config: DegradationConfig, affine: np.ndarray, stats: IntensityStats
) -> np.ndarray:
    """The degradation of a z-scored volume, as z-scores with the same statistics.

    The degradation keeps the magnitude of the inverse FFT, as a scanner does: it is not linear
    in signed z-scores, so it runs in the scan's own units, as in `prepare` (where N4 may leave
    the background a little below 0: :func:`~mrisr_cli.degradation.lowres_volume` shifts such
    an image to 0 and back, here as there).
    """
    return stats.normalise(degrade_volume(stats.denormalise(hr_z), config, affine=affine))


def quantise(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """float -> uint8 between the volume's own minimum and maximum."""
    low, high = float(volume.min()), float(volume.max())
    scale = (high - low) or 1.0
    codes = np.rint((volume.astype(np.float32) - low) * (255.0 / scale))
    return codes.astype(np.uint8), low, high


def dequantise(codes: np.ndarray, low: float, high: float) -> np.ndarray:
    return (low + codes.astype(np.float32) * np.float32(((high - low) or 1.0) / 255.0)).astype(
        np.float32
    )


def pack_dataset(
    data_dir: Path,
    out_dir: Path,
    *,
    splits: Sequence[str] = SPLITS,
    margin: int = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """Write one ``<id>.npz`` per subject of ``splits`` and ``pack.json``; return the latter."""
    manifest = load_manifest(Path(data_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects = []
    for record in manifest.subjects:
        if record["split"] not in splits:
            continue
        folder = manifest.root / "subjects" / record["id"]
        hr = np.load(folder / "hr.npy", mmap_mode="r")
        box = foreground_box(
            np.load(folder / "mask.npy", mmap_mode="r"), margin, manifest.degradation.factors()
        )
        codes, low, high = quantise(np.asarray(hr[box], dtype=np.float32))
        start = np.array([s.start for s in box], dtype=float)
        affine = np.asarray(record["affine"], dtype=float)
        affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
        path = out_dir / f"{record['id']}.npz"
        with atomic_path(path, overwrite=True) as tmp, tmp.open("wb") as handle:
            np.savez_compressed(handle, hr=codes, low=low, high=high, affine=affine)
        kept = {k: v for k, v in record.items() if k not in ("files", "affine", "shape")}
        subjects.append(dict(kept, crop_start=[int(s) for s in start], file=path.name))
    if not subjects:
        raise InputError(f"{data_dir}: no subjects in the splits {', '.join(splits)}")
    pack = {
        "format": PACK_FORMAT,
        "version": 1,
        "source_fingerprint": manifest.fingerprint,
        "degradation": json.loads(manifest.degradation.to_json()),  # spacing and N4 included
        "split": json.loads((manifest.root / MANIFEST_NAME).read_text())["split"],
        "margin": margin,
        "subjects": subjects,
    }
    with atomic_path(out_dir / PACK_MANIFEST, overwrite=True) as tmp:
        tmp.write_text(json.dumps(pack, indent=1, sort_keys=True) + "\n")
    return pack


def _unpack_subject(pack_dir: Path, out_dir: Path, degradation: str, entry: dict) -> dict:
    config = DegradationConfig.from_json(degradation)
    with np.load(pack_dir / entry["file"]) as stored:
        hr = dequantise(stored["hr"], float(stored["low"]), float(stored["high"]))
        affine = np.asarray(stored["affine"], dtype=float)
    stats = IntensityStats(float(entry["intensity"]["mean"]), float(entry["intensity"]["std"]))
    lr = degrade_zscores(hr, config, affine, stats)
    mask = foreground_mask(hr)
    folder = out_dir / "subjects" / entry["id"]
    folder.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in entry.items() if k not in ("file", "crop_start")}
    record.update(
        shape=[int(n) for n in hr.shape],
        affine=affine.round(6).tolist(),
        foreground_voxels=int(mask.sum()),
        packed={"crop_start": entry["crop_start"], "quantised": "uint8"},
        files=write_subject_arrays(folder, entry["id"], hr, lr, mask),
    )
    return record


def unpack_dataset(pack_dir: Path, out_dir: Path, *, jobs: int = 1) -> dict[str, Any]:
    """Rebuild a `mrisr train` data folder from a pack (``jobs`` subjects in parallel processes);
    the split is kept as packed."""
    pack_dir, out_dir = Path(pack_dir), Path(out_dir)
    try:
        pack = json.loads((pack_dir / PACK_MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{pack_dir}: no readable {PACK_MANIFEST} ({exc})") from exc
    if pack.get("format") != PACK_FORMAT:
        raise InputError(f"{pack_dir / PACK_MANIFEST}: not an mrisr dataset pack")
    config = DegradationConfig.from_json(json.dumps(pack["degradation"]))
    work = partial(_unpack_subject, pack_dir, out_dir, config.to_json())
    entries = pack["subjects"]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(entries))) as pool:
            records = list(pool.map(work, entries))
    else:
        records = [work(entry) for entry in entries]
    records.sort(key=lambda r: r["id"])
    split = dict(pack["split"], packed_from=pack["source_fingerprint"])
    return save_manifest(out_dir, config, split, records, [])
