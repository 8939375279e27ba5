"""Random LR/HR training patches from a prepared dataset, read ahead so the GPU never waits.

Sampling is counter-based: sample ``i`` of the global batch identified by ``key`` (the step and
the sub-step) is drawn from its own generator seeded with ``(seed, *key, i)``. So a batch is a
pure function of the step: resuming needs no sampler state, read-ahead threads can build batches
out of order, and a DistributedDataParallel rank simply takes its slice of the global batch, which
makes N processes see exactly the data one process sees with an N times larger batch.

Volumes are memory-mapped ``.npy`` files (the page cache keeps the hot ones in RAM). Each patch is
centred on a foreground voxel with probability ``foreground_fraction`` (else anywhere: the model
must also see the background and the head's edge), then
flipped along each of ``flip_axes`` with probability 1/2, LR and HR together: the degradation's
windows are symmetric about the DC sample, so a flipped pair is still a valid pair.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from mrisr_cli.errors import InputError
from mrisr_cli.manifest import Manifest
from mrisr_cli.prepare import CENTRE_STRIDE
from mrisr_cli.tiling import PAPER_PATCH

Key = tuple[int, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class PatchOptions:
    """How patches are drawn."""

    patch: tuple[int, int, int] = PAPER_PATCH
    foreground_fraction: float = 0.9
    flip_axes: tuple[int, ...] = (0, 1, 2)


@dataclass
class SubjectArrays:
    """One prepared subject: memory-mapped volumes and its candidate patch centres."""

    id: str
    hr: np.ndarray
    lr: np.ndarray
    mask: np.ndarray
    centres: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.hr.shape  # type: ignore[return-value]


def open_subject(root: Path, record: dict[str, Any]) -> SubjectArrays:
    """Memory-map one subject's arrays, checking they exist and agree in shape."""
    arrays = {}
    for name in ("hr", "lr", "mask", "centres"):
        path = Path(root) / record["files"][name]["path"]
        try:
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{path}: missing or unreadable; rerun `mrisr prepare` on this data folder"
            ) from exc
    shape = tuple(record["shape"])
    if any(arrays[n].shape != shape for n in ("hr", "lr", "mask")):
        raise InputError(f"{root}: arrays of subject {record['id']!r} do not match the manifest")
    return SubjectArrays(
        record["id"], arrays["hr"], arrays["lr"], arrays["mask"], arrays["centres"]
    )


def open_split(manifest: Manifest, split: str) -> list[SubjectArrays]:
    return [open_subject(manifest.root, record) for record in manifest.split(split)]


def crop(volume: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """``volume[start:start+size]`` as float32, edge-padded where the volume is too small."""
    slices = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    out = np.asarray(volume[slices], dtype=np.float32)
    if out.shape != tuple(size):
        pads = [(0, n - m) for n, m in zip(size, out.shape, strict=True)]
        out = np.pad(out, pads, mode="edge")
    return out


@dataclass(frozen=True)
class PatchDraw:
    """One random draw: which subject, the chosen centre, the patch origin, the flipped axes."""

    subject: int
    centre: tuple[int, int, int]
    start: tuple[int, int, int]
    flips: tuple[int, ...]


class PatchSampler:
    """Draws LR/HR patch pairs; a batch depends only on (seed, key, sample index)."""

    def __init__(self, subjects: list[SubjectArrays], options: PatchOptions, seed: int = 0) -> None:
        if not subjects:
            raise InputError("no training subjects in this data folder (check its split)")
        if not 0.0 <= options.foreground_fraction <= 1.0:
            raise ValueError("foreground_fraction must lie in [0, 1]")
        self.subjects = subjects
        self.options = options
        self.seed = seed

    def draw(self, key: Key, index: int) -> PatchDraw:
        """Where patch ``index`` of the global batch ``key`` comes from (no voxel is read)."""
        rng = np.random.default_rng([self.seed, *key, index])
        subject_index = int(rng.integers(len(self.subjects)))
        subject = self.subjects[subject_index]
        size = np.asarray(self.options.patch)
        shape = np.asarray(subject.shape)
        use_foreground = rng.random() < self.options.foreground_fraction
        if use_foreground and len(subject.centres):
            grid = np.asarray(subject.centres[int(rng.integers(len(subject.centres)))], int)
            centre = np.minimum(grid + rng.integers(0, CENTRE_STRIDE, 3), shape - 1)
            if not subject.mask[tuple(centre)]:  # the jitter left the foreground: its grid point
                centre = grid
        else:
            centre = rng.integers(0, shape)
        start = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
        flips = tuple(a for a in self.options.flip_axes if rng.random() < 0.5)
        return PatchDraw(
            subject_index,
            (int(centre[0]), int(centre[1]), int(centre[2])),
            (int(start[0]), int(start[1]), int(start[2])),
            flips,
        )

    def sample(self, key: Key, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch ``index`` of the global batch ``key``: (lr, hr) float32 arrays."""
        where = self.draw(key, index)
        subject = self.subjects[where.subject]
        lr = crop(subject.lr, where.start, self.options.patch)
        hr = crop(subject.hr, where.start, self.options.patch)
        if where.flips:
            lr = np.flip(lr, where.flips)
            hr = np.flip(hr, where.flips)
        return lr, hr

    def batch(self, key: Key, size: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``offset .. offset + size - 1`` of global batch ``key``, shaped (B,1,X,Y,Z)."""
        pairs = [self.sample(key, offset + i) for i in range(size)]
        lr = np.stack([p[0] for p in pairs])[:, None]
        hr = np.stack([p[1] for p in pairs])[:, None]
        return np.ascontiguousarray(lr), np.ascontiguousarray(hr)


class Prefetcher(Generic[T]):
    """Runs ``fetch(key)`` for a sequence of keys in worker threads, ``depth`` ahead, and
    yields the results in order; ``wait_seconds`` is the time the consumer spent blocked."""

    def __init__(
        self, fetch: Callable[[Key], T], keys: Iterable[Key], *, depth: int = 4, workers: int = 2
    ) -> None:
        self._fetch = fetch
        self._keys = iter(keys)
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="patches")
        self._pending: deque[Future[T]] = deque()
        self.wait_seconds = 0.0
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._depth:
            key = next(self._keys, None)
            if key is None:
                return
            self._pending.append(self._pool.submit(self._fetch, key))

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        started = time.perf_counter()
        result = future.result()
        self.wait_seconds += time.perf_counter() - started
        self._fill()
        return result

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
