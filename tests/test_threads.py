"""configure_threads: which source wins, and that torch, SimpleITK and the environment follow."""

from __future__ import annotations

import os

import pytest
import SimpleITK as sitk
import torch

from mrisr_cli import threads as threads_module
from mrisr_cli.errors import MrisrError
from mrisr_cli.threads import (
    THREAD_ENV_VARS,
    available_cpus,
    cgroup_cpu_limit,
    configure_threads,
    resolve_thread_count,
)


@pytest.fixture(autouse=True)
def clean_thread_env(monkeypatch: pytest.MonkeyPatch):
    """Start each test with no thread variables set, and put every global back afterwards.

    monkeypatch restores the variables configure_threads writes, since they are deleted here first.
    """
    for name in ("SLURM_CPUS_PER_TASK", *THREAD_ENV_VARS):
        monkeypatch.delenv(name, raising=False)
    torch_before = torch.get_num_threads()
    sitk_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    yield
    torch.set_num_threads(torch_before)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_before)


@pytest.fixture
def sixteen_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that may use 16 CPUs, whatever this machine has (CI has 2)."""
    monkeypatch.setattr(threads_module, "available_cpus", lambda: 16)


@pytest.mark.usefixtures("sixteen_cpus")
def test_explicit_count_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert configure_threads(3) == 3
    assert torch.get_num_threads() == 3


@pytest.mark.usefixtures("sixteen_cpus")
def test_slurm_wins_over_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert configure_threads(None) == 2
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("sixteen_cpus")
def test_omp_used_without_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads() == 3
    assert torch.get_num_threads() == 3


@pytest.mark.usefixtures("sixteen_cpus")
def test_omp_nested_list_uses_first_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2,4")
    assert resolve_thread_count() == 2


@pytest.mark.parametrize(
    ("affinity", "cpu_count", "cgroup_limit", "expected"),
    [
        ({0, 2, 5}, 8, None, 3),  # the affinity mask, not the machine's 8 CPUs
        ({0, 1, 2, 3, 4, 5}, 8, 4, 4),  # capped by the container's quota
        ({1, 3}, 8, 6, 2),  # a quota above the mask changes nothing
        (None, 3, None, 3),  # no affinity call on this platform: os.cpu_count()
        (None, 8, 2, 2),  # ... capped by the quota too
    ],
)
def test_falls_back_to_cpu_affinity_capped_by_the_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch,
    affinity: set[int] | None,
    cpu_count: int,
    cgroup_limit: int | None,
    expected: int,
) -> None:
    if affinity is None:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    else:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    monkeypatch.setattr(threads_module, "cgroup_cpu_limit", lambda: cgroup_limit)
    assert available_cpus() == expected
    assert configure_threads() == expected
    assert torch.get_num_threads() == expected


def test_this_machine_has_a_positive_cpu_count() -> None:
    count = available_cpus()
    assert isinstance(count, int) and count >= 1


@pytest.mark.parametrize("bad", ["", "zero", "0", "-3", "1.5"])
@pytest.mark.usefixtures("sixteen_cpus")
def test_unusable_slurm_value_falls_through(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", bad)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_thread_count() == 2


@pytest.mark.parametrize("bad", [0, -1, True])
def test_bad_explicit_count_is_a_user_error(bad: int) -> None:
    with pytest.raises(MrisrError, match="positive integer"):
        configure_threads(bad)


@pytest.mark.usefixtures("sixteen_cpus")
def test_sets_env_for_children_and_simpleitk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert configure_threads() == 2
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        assert os.environ[name] == "2", name
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2


def test_can_be_called_again_with_another_count() -> None:
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert configure_threads(2) == 2
    assert torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"


def test_environment_counts_are_capped_by_the_cpus_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job step or container that got 4 CPUs but inherited SLURM_CPUS_PER_TASK=32 uses 4."""
    monkeypatch.setattr(threads_module, "available_cpus", lambda: 4)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    assert resolve_thread_count() == 4
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert resolve_thread_count() == 4
    assert resolve_thread_count(8) == 8  # --threads is taken as given
    assert resolve_thread_count(16) == 16  # up to 4 per CPU


def test_a_thread_count_far_beyond_the_cpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """--threads 100000 started threads until memory ran out (three MemoryError tracebacks)."""
    monkeypatch.setattr(threads_module, "available_cpus", lambda: 2)
    for typo in (9, 100000, 10**20):
        with pytest.raises(
            MrisrError, match=f"--threads {typo} is more than 4 per CPU .* at most 8"
        ):
            configure_threads(typo)


def _cgroup_v1(root, quota: str, period: str = "100000", mount: str = "cpu", path: str = ""):
    folder = root / mount / path
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (folder / "cpu.cfs_period_us").write_text(period + "\n")
    return root


def _limit(root, proc_cgroup: str = "0::/\n") -> int | None:
    """cgroup_cpu_limit on a fake /sys/fs/cgroup tree, with this process's /proc/self/cgroup."""
    proc = root / "proc_self_cgroup"  # inside the fake tree, where no cgroup file is named so
    proc.write_text(proc_cgroup)
    return cgroup_cpu_limit(root, proc)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("400000 100000\n", 4), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)],
)
def test_cgroup_v2_quota(tmp_path, content: str, expected: int | None) -> None:
    """docker --cpus 4 writes "400000 100000"; 1.5 CPUs round up to 2; "max" is no limit."""
    (tmp_path / "cpu.max").write_text(content)
    assert _limit(tmp_path) == expected


@pytest.mark.parametrize(("quota", "expected"), [("300000", 3), ("-1", None)])
def test_cgroup_v1_quota(tmp_path, quota: str, expected: int | None) -> None:
    assert _limit(_cgroup_v1(tmp_path, quota), "1:cpu:/\n0::/\n") == expected


@pytest.mark.parametrize("content", ["", "garbage\n", "100000\n", "0 100000\n", "100 0\n"])
def test_unreadable_cgroup_quota_is_no_limit(tmp_path, content: str) -> None:
    (tmp_path / "cpu.max").write_text(content)
    assert _limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent.proc") is None


def test_cgroup_v2_quota_of_a_service_on_a_bare_host(tmp_path) -> None:
    """systemd-run -p CPUQuota=300% on a host: the quota sits in the service's own cgroup, which
    /proc/self/cgroup names; the root cgroup has no cpu.max."""
    service = tmp_path / "system.slice" / "run-u7.service"
    service.mkdir(parents=True)
    (service / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "system.slice" / "cpu.max").write_text("max 100000\n")
    assert _limit(tmp_path, "0::/system.slice/run-u7.service\n") == 3
    assert _limit(tmp_path, "0::/user.slice/user-0.slice\n") is None  # another cgroup


def test_a_parent_cgroup_quota_caps_its_children(tmp_path) -> None:
    """A slice limited to 2 CPUs holds a job that asks for 8: the job gets 2 CPUs' worth."""
    job = tmp_path / "batch.slice" / "job_42"
    job.mkdir(parents=True)
    (job / "cpu.max").write_text("800000 100000\n")
    (tmp_path / "batch.slice" / "cpu.max").write_text("200000 100000\n")
    assert _limit(tmp_path, "0::/batch.slice/job_42\n") == 2


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct", "cpuacct,cpu", "cpu,cpuacct,cpuset"])
def test_cgroup_v1_quota_of_the_process_cgroup(tmp_path, mount: str) -> None:
    """cgroup v1 names the cpu controller's hierarchy on its own line, mounted as cpu or
    cpu,cpuacct; a quota deeper in it counts."""
    _cgroup_v1(tmp_path, "200000", mount=mount, path="slurm/uid_0/job_9")
    proc = "12:memory:/slurm/uid_0/job_9\n4:cpu,cpuacct:/slurm/uid_0/job_9\n0::/\n"
    assert _limit(tmp_path, proc) == 2


def test_a_cgroup_outside_the_namespace_reads_the_mount_only(tmp_path) -> None:
    """/proc/self/cgroup names "/../x" for a cgroup above the container's namespace root: its
    quota is not in this tree, and "/.." must not walk out of it."""
    root, outside = tmp_path / "cgroup", tmp_path / "outside"
    for folder, quota in ((root, "200000"), (outside, "100000"), (root / "outside", "100000")):
        folder.mkdir()
        (folder / "cpu.max").write_text(f"{quota} 100000\n")
    assert _limit(root, "0::/../outside\n") == 2


def test_container_without_cgroup_namespace_reads_its_mount(tmp_path) -> None:
    """Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path,
    which does not exist inside the container; the container's own cgroup is the mount."""
    _cgroup_v1(tmp_path, "400000")
    assert _limit(tmp_path, "4:cpu,cpuacct:/docker/0123abcd\n") == 4


def test_container_quota_caps_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-CPU container on a host whose cores are all in the affinity mask gets 2 threads."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(threads_module, "cgroup_cpu_limit", lambda: 2)
    assert available_cpus() == 2
    assert resolve_thread_count() == 2
    monkeypatch.setattr(threads_module, "cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 64
