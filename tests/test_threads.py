"""configure_threads: which source wins, and that torch, SimpleITK and the environment follow."""

from __future__ import annotations

import os

import pytest
import SimpleITK as sitk
import torch

from mrisr_cli.errors import MrisrError
from mrisr_cli.threads import (
    THREAD_ENV_VARS,
    available_cpus,
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


def test_explicit_count_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert configure_threads(3) == 3
    assert torch.get_num_threads() == 3


def test_slurm_wins_over_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert configure_threads(None) == 2
    assert torch.get_num_threads() == 2


def test_omp_used_without_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_threads() == 3
    assert torch.get_num_threads() == 3


def test_omp_nested_list_uses_first_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2,4")
    assert resolve_thread_count() == 2


def test_falls_back_to_cpu_affinity() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cpus() == expected
    assert configure_threads() == expected
    assert torch.get_num_threads() == expected


@pytest.mark.parametrize("bad", ["", "zero", "0", "-3", "1.5"])
def test_unusable_slurm_value_falls_through(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", bad)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_thread_count() == 2


@pytest.mark.parametrize("bad", [0, -1, True])
def test_bad_explicit_count_is_a_user_error(bad: int) -> None:
    with pytest.raises(MrisrError, match="positive integer"):
        configure_threads(bad)


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
