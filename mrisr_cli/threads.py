"""How many CPU threads one mrisr process uses, decided once and applied everywhere.

Why this exists: on a cluster node or in a container, ``os.cpu_count()`` reports every core of the
machine, not the few that SLURM or a cgroup gave this job. torch, ITK (SimpleITK and ANTsPy) and
OpenMP would each start that many threads and oversubscribe the allocation, which is slower than
using the right number. This module picks the number from what the job was given and hands it to
every library that runs threads.
"""

from __future__ import annotations

import os

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


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, which honours cgroups and ``taskset``.

    ``os.cpu_count()`` (the whole machine) is only the fallback where affinity is not available.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


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


def resolve_thread_count(threads: int | None = None) -> int:
    """The thread count to use, without applying it.

    In order: the explicit argument (``--threads``), ``SLURM_CPUS_PER_TASK`` (what the job asked
    for), ``OMP_NUM_THREADS`` (what the user or the launcher, e.g. torchrun, set), then the CPUs in
    this process's affinity mask.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise MrisrError(f"the number of threads must be a positive integer, got {threads!r}")
        return threads
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = _count_from_env(name)
        if value is not None:
            return value
    return available_cpus()


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
