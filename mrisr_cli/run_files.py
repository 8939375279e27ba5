"""The files of a training run's folder: their names, the checkpoint, the JSON-lines log.

A checkpoint holds what ``--resume`` needs to continue bit for bit (among it the random generator
states, taken and restored here). It is written to a temporary file and renamed, so a full disk
leaves the previous one, and read with ``weights_only=True``, so a foreign file runs no code.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrisr_cli.errors import InputError, OutputError
from mrisr_cli.volumes import atomic_path, os_reason

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
RUN_NAME = "run.json"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
#: the GAN stage's critic at the last export: --init-critic continues the stage from it
CRITIC_NAME = "critic.safetensors"
CHECKPOINT_FORMAT = "mrisr-checkpoint"
CHECKPOINT_VERSION = 1


# --- RNG states -------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in weights_only-loadable types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` took."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints ------------------------------------------------------------------------------


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_failure(exc: BaseException, folder: Path, needed: int) -> str:
    """Why a write into ``folder`` failed, in words. torch.save reports a full disk as a
    RuntimeError of its zip writer ("[enforce fail at inline_container.cc:672] . unexpected pos
    60672 vs 60576"), which tells a user nothing; the free space does."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on device"
        if exc.errno == errno.EDQUOT:
            return "disk quota exceeded"
        return os_reason(exc)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < needed:
        mib = 2**20
        return f"no space left on device ({free / mib:.1f} MiB free, {needed / mib:.1f} needed)"
    return "the write failed (disk full or quota exceeded?)"


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, renamed into place: a failed write (disk full) leaves
    the previous checkpoint as it was, and the message says whether there is one."""
    try:
        with atomic_path(path, overwrite=True) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:
        reason = write_failure(exc, path.parent, tensor_bytes(payload))
        kept = (
            "the previous checkpoint is kept"
            if path.is_file()
            else "no checkpoint has been saved yet"
        )
        raise OutputError(f"{path}: could not write the checkpoint ({reason}); {kept}") from exc


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling code (``weights_only=True``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no checkpoint to resume from") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise InputError(f"{path}: checkpoint is unreadable or corrupt ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an mrisr training checkpoint")
    return payload


# --- provenance and log -----------------------------------------------------------------------


def git_commit() -> str:
    """The source commit (``MRISR_GIT_COMMIT`` in containers without .git), '-dirty' if edited."""
    if os.environ.get("MRISR_GIT_COMMIT"):
        return os.environ["MRISR_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def append_resume(path: Path, entry: dict[str, Any]) -> bool:
    """Add ``entry`` to the "resumes" list of run.json (a temporary file renamed, as run.json is
    written), so that it records where and with what each call after the first ran. A missing
    run.json is started with the list alone; one that is not a JSON object is left as it is
    (False): a resume is not refused over its record."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        record = {}
    except (OSError, ValueError):  # a UnicodeDecodeError is a ValueError
        return False
    if not isinstance(record, dict) or not isinstance(record.get("resumes", []), list):
        return False
    record["resumes"] = [*record.get("resumes", []), entry]
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return True


class JsonlLog:
    """Append-only JSON-lines log of one run (rank 0 only), counted so a resume can cut it back
    to the records written before its checkpoint."""

    def __init__(self, path: Path, *, keep: int | None = None) -> None:
        self.path = Path(path)
        self.records = 0
        if keep is not None and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)[:keep]
            with atomic_path(self.path, overwrite=True) as tmp:
                tmp.write_text("".join(lines))
            self.records = len(lines)

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=_json_default) + "\n")
        except OSError as exc:
            raise OutputError(f"{self.path}: could not write the log ({exc.strerror})") from exc
        self.records += 1


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's JSONL log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
