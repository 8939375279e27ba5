"""Several training processes (torchrun or SLURM's srun): where this one stands, and the few
collective calls training needs.

Every helper is a no-op for a single process, so the training loop is written once; the process
group is joined only when a launcher set the environment for one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from mrisr_cli.errors import MrisrError
from mrisr_cli.inference import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a DistributedDataParallel job (1 process when not launched so)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> DistInfo:
    """Rank and world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or, for a plain
    ``srun`` launch with MASTER_ADDR/MASTER_PORT exported, from SLURM's task variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in env and "SLURM_PROCID" in env:
        info = DistInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"] = str(info.rank), str(info.world)
        env["LOCAL_RANK"] = str(info.local_rank)
        return info
    return DistInfo()


def worker_threads(threads: int | None) -> int | None:
    """CPU threads per process: under torchrun with SLURM_CPUS_PER_TASK, that share per worker."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if threads is None and local > 1 and slurm.isdigit():
        return max(1, int(slurm) // local)
    return threads


def init_distributed(device: str) -> tuple[DistInfo, str, bool]:
    """Join the process group if launched by torchrun/srun; return (info, device, we_started)."""
    import torch.distributed as dist

    info = dist_from_env()
    if not info.enabled:
        return info, resolve_device(device), False
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        resolved = f"cuda:{info.local_rank}"
    else:
        resolved = resolve_device(device)
    if dist.is_initialized():
        return info, resolved, False
    backend = "nccl" if resolved.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world)
    return info, resolved, True


def all_gather(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait until every rank is here (after what rank 0 alone does, such as a checkpoint)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def errors_shared(info: DistInfo) -> Iterator[None]:
    """Run a block that some ranks may leave with a user error (rank 0 writing a file: the
    run folder, weights, a checkpoint), then raise that error on every rank. Otherwise the
    others meet the gone rank at their next collective call: an internal error ("Connection
    closed by peer") or, where the backend does not notice, a wait until the process group
    times out (a plain ``srun`` kills no one).
    """
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # a bug too: the others must not wait for this rank either
        if not info.enabled:
            raise
        error = exc
    if error is None or isinstance(error, MrisrError):
        message = None if error is None else str(error)
    else:
        message = f"process {info.rank} failed ({type(error).__name__}: {error})"
    messages = all_gather(info, message)
    if error is not None:
        raise error
    first = next((m for m in messages if m), None)
    if first:
        raise MrisrError(first)
