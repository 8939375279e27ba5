"""How many CPU threads one mrisr process uses, decided once and applied everywhere.

Why this exists: on a cluster node or in a container, ``os.cpu_count()`` reports every core of the
machine, not the few that SLURM or a cgroup gave this job. torch, ITK (SimpleITK and ANTsPy) and
OpenMP would each start that many threads and oversubscribe the allocation, which is slower than
using the right number. This module picks the number from what the job was given and hands it to
every library that runs threads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mrisr_cli.errors import MrisrError

#: Variables set for child processes and for libraries that read them lazily: OpenMP and MKL (numpy,
#: scipy, torch's CPU kernels in a subprocess), OpenBLAS (numpy/scipy wheels), and ITK, whose global
#: default ANTsPy reads when it first builds a filter.
THREAD_ENV_VARS: tuple[str, ...] = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


def _own_cgroups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup v2 path and cgroup v1 ``cpu`` path, from ``/proc/self/cgroup``.

    Lines read ``0::/system.slice/x.service`` (v2) and ``4:cpu,cpuacct:/docker/abc`` (v1). Both
    are "/" where the file is missing or a container namespaces its cgroups (it sees itself at
    the root).
    """
    v2 = v1 = "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if parts[0] == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _up_to(top: Path, relative: str) -> list[Path]:
    """``top/relative`` and each of its parents up to ``top`` itself, deepest first. A path that
    leaves the namespace (``/../x``: a cgroup outside the container's view) gives ``top`` only."""
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts:
        return [top]
    return [top.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v1_cpu_mounts(root: Path) -> list[Path]:
    """Where cgroup v1 mounts the CPU controller: ``cpu``, ``cpu,cpuacct``, ``cpuacct,cpu`` (the
    name differs by distribution), or a hierarchy that holds it with others."""
    try:
        return [d for d in root.iterdir() if "cpu" in d.name.split(",") and d.is_dir()]
    except OSError:  # no cgroup folder (macOS, Windows)
        return []


def _quota_in(folder: Path) -> tuple[int, int] | None:
    """The (quota, period) in microseconds that ``folder`` sets, or None where it sets none."""
    try:
        v2 = folder / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        if quota == "max":
            return None
        quota_us, period_us = int(quota), int(period)
    except (OSError, ValueError):  # no such files (macOS, Windows, no limit here), odd content
        return None
    if quota_us <= 0 or period_us <= 0:  # -1: no limit (cgroup v1)
        return None
    return quota_us, period_us


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """The tightest CPU bandwidth limit over this process's cgroup and its parents, rounded up;
    None where there is none.

    ``docker run --cpus 4``, Kubernetes CPU limits and systemd's ``CPUQuota`` (``systemd-run -p
    CPUQuota=400%``, a user slice) do not shrink the affinity mask: a 4-CPU container on a 64-core
    host sees 64 CPUs, and 64 threads sharing 4 CPUs' worth of time run slower than 4. The limit is
    ``cpu.max`` (cgroup v2, ``"max 100000"`` or ``"400000 100000"``) or ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us`` (cgroup v1, -1 for none), read in the cgroup that ``/proc/self/cgroup``
    names and in every parent up to the mount (each one caps its children), and at the mount
    itself: a container that does not namespace its cgroups mounts its own cgroup there while
    ``/proc/self/cgroup`` still names the host's path.
    """
    v2_path, v1_path = _own_cgroups(proc_cgroup)
    folders = _up_to(root, v2_path)
    for mount in _v1_cpu_mounts(root):
        folders += _up_to(mount, v1_path)
    limits = [
        math.ceil(quota / period)
        for quota, period in filter(None, (_quota_in(folder) for folder in folders))
    ]
    return max(1, min(limits)) if limits else None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (``taskset``, cpusets, SLURM's binding),
    capped by the container's CPU quota (:func:`cgroup_cpu_limit`).

    ``os.cpu_count()`` (the whole machine) is only the fallback where affinity is not available.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        count = min(count, limit)
    return max(1, count)


def _count_from_env(name: str) -> int | None:
    """A positive thread count read from an environment variable, or None if unset or unusable.

    OpenMP allows a nested list (``OMP_NUM_THREADS=8,2``); its first level is the one that counts
    here. A value that is not a positive integer is ignored, so the next source decides.
    """
    raw = os.environ.get(name, "").split(",")[0].strip()
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value > 0 else None


#: An explicit thread count above this many per usable CPU is refused as a typo.
MAX_THREADS_PER_CPU = 4


def resolve_thread_count(threads: int | None = None) -> int:
    """The thread count to use, without applying it.

    In order: the explicit argument (``--threads``), ``SLURM_CPUS_PER_TASK`` (what the job asked
    for), ``OMP_NUM_THREADS`` (what the user or the launcher, e.g. torchrun, set), then the CPUs
    this process may use (:func:`available_cpus`). The two variables are capped by those CPUs: they
    are inherited by job steps and containers that got fewer, and more threads than CPUs only
    slow the work down. An explicit ``--threads`` is taken as given up to
    :data:`MAX_THREADS_PER_CPU` per CPU; beyond that it is a typo (``--threads 100000`` made
    torch start threads until memory ran out).
    """
    cpus = available_cpus()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise MrisrError(f"the number of threads must be a positive integer, got {threads!r}")
        if threads > MAX_THREADS_PER_CPU * cpus:
            raise MrisrError(
                f"--threads {threads} is more than {MAX_THREADS_PER_CPU} per CPU this process may "
                f"use ({cpus}): give at most {MAX_THREADS_PER_CPU * cpus}"
            )
        return threads
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = _count_from_env(name)
        if value is not None:
            return min(value, cpus)
    return cpus


def configure_threads(threads: int | None = None) -> int:
    """Decide the thread count and apply it to torch, SimpleITK and the environment; return it.

    torch and SimpleITK are set directly because their thread pools may already exist, and
    changing environment variables no longer reaches them. The variables in
    :data:`THREAD_ENV_VARS` are set for what starts later: ANTsPy's ITK filters, and child
    processes such as data-loader workers. Call it once per process, early, before heavy work.
    """
    count = resolve_thread_count(threads)

    for name in THREAD_ENV_VARS:
        os.environ[name] = str(count)

    import torch  # heavy imports here, so that importing this module stays cheap

    torch.set_num_threads(count)
    try:
        import SimpleITK as sitk
    except ImportError:  # an install without the preprocessing extras: nothing to set
        return count
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    return count
