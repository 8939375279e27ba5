"""The worker pool of prepare and evaluate stops with the command: queued work is cancelled, a
running task unwinds (no temporary file left), a deaf worker is killed, Ctrl-C is the parent's."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mrisr_cli import workers
from mrisr_cli.volumes import atomic_path
from mrisr_cli.workers import WorkerPool


def write_slowly(folder: Path, name: str, seconds: float) -> int:
    """Mark the start, then hold a temporary file open for ``seconds`` before it is renamed."""
    (folder / f"started-{name}").touch()
    with atomic_path(folder / f"{name}.txt", overwrite=False) as tmp:
        tmp.write_text(name)
        time.sleep(seconds)
    return os.getpid()


def slow_to_clean_up(folder: Path) -> None:
    """A task whose cleanup (as atomic_path's removal of its temporary file) takes a while."""
    part = folder / ".out.part"
    part.touch()
    try:
        time.sleep(120)
    finally:
        time.sleep(1.0)
        part.unlink()


def deaf(folder: Path, seconds: float) -> None:
    """A task that ignores SIGTERM, as one inside a long C call does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (folder / "started-deaf").touch()
    time.sleep(seconds)


def wait_for(condition: object, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def processes_of(pool: WorkerPool) -> list[object]:
    return list(pool._executor._processes.values())  # type: ignore[attr-defined]


def test_a_stop_cancels_the_queue_and_unwinds_the_running_tasks(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), WorkerPool(2) as pool:
        futures = [pool.submit(write_slowly, tmp_path, name, 120.0) for name in "abcd"]
        wait_for(lambda: len(list(tmp_path.glob(".*.part*"))) == 2, "two tasks writing")
        running = processes_of(pool)
        raise KeyboardInterrupt  # Ctrl-C in the parent while two subjects run, two wait
    assert not any(p.is_alive() for p in running)  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started-a", "started-b"]
    # the executor hands one task ahead to its call queue (uncancellable, never started)
    assert futures[3].cancelled()


def test_stopped_workers_end_quietly_busy_or_idle(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """An idle worker (waiting for work) ends at once, without the traceback that a
    KeyboardInterrupt in the executor's loop prints; the busy one after unwinding its task."""
    with pytest.raises(KeyboardInterrupt), WorkerPool(2) as pool:
        quick = pool.submit(write_slowly, tmp_path, "quick", 0.0)
        pool.submit(write_slowly, tmp_path, "a", 120.0)
        quick.result(timeout=60)  # its worker now waits for work
        wait_for(lambda: (tmp_path / "started-a").exists(), "the task to start")
        running = processes_of(pool)
        raise KeyboardInterrupt
    assert len(running) == 2
    assert [p.exitcode for p in running] == [128 + signal.SIGTERM] * 2  # type: ignore[attr-defined]
    assert "Traceback" not in capfd.readouterr().err


def test_a_second_ctrl_c_while_stopping_kills_a_deaf_worker_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for the workers to unwind, the parent takes a second Ctrl-C as "stop now": it
    used to leave the waiting (and the kill) undone, and Python then waited at exit for the deaf
    worker's task to end."""
    monkeypatch.setattr(workers, "STOP_GRACE_SECONDS", 120.0)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
        with pytest.raises(KeyboardInterrupt), WorkerPool(1) as pool:
            pool.submit(deaf, tmp_path, 120.0)
            wait_for(lambda: (tmp_path / "started-deaf").exists(), "the task to start")
            running = processes_of(pool)
            timer.start()  # the second Ctrl-C, while stop() waits out the grace period
            raise KeyboardInterrupt
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert running and not any(p.is_alive() for p in running)  # type: ignore[attr-defined]


def test_a_worker_deaf_to_sigterm_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "STOP_GRACE_SECONDS", 0.5)
    with pytest.raises(KeyboardInterrupt), WorkerPool(1) as pool:
        pool.submit(deaf, tmp_path, 120.0)
        wait_for(lambda: (tmp_path / "started-deaf").exists(), "the task to start")
        running = processes_of(pool)
        raise KeyboardInterrupt
    assert running and not any(p.is_alive() for p in running)  # type: ignore[attr-defined]


def test_ctrl_c_reaching_the_workers_is_left_to_the_parent(tmp_path: Path) -> None:
    """A terminal sends SIGINT to the whole process group: a worker goes on with its task (the
    parent decides whether to stop) instead of dying with a traceback."""
    with WorkerPool(1) as pool:
        future = pool.submit(write_slowly, tmp_path, "a", 1.0)
        wait_for(lambda: (tmp_path / "started-a").exists(), "the task to start")
        for process in processes_of(pool):
            os.kill(process.pid, signal.SIGINT)  # type: ignore[attr-defined]
        pid = future.result(timeout=60)
    assert pid != os.getpid() and (tmp_path / "a.txt").read_text() == "a"


def test_a_second_sigterm_does_not_break_off_a_workers_cleanup(tmp_path: Path) -> None:
    """scancel sends SIGTERM to every process of the job, and the parent's stop sends the
    workers another: that one used to interrupt the unwinding task, leaving its temporary file."""
    with pytest.raises(KeyboardInterrupt), WorkerPool(1) as pool:
        pool.submit(slow_to_clean_up, tmp_path)
        wait_for(lambda: (tmp_path / ".out.part").exists(), "the task to start")
        (worker,) = processes_of(pool)
        os.kill(worker.pid, signal.SIGTERM)  # type: ignore[attr-defined]
        time.sleep(0.2)  # the worker is in its cleanup now
        raise KeyboardInterrupt  # the parent stops too, and signals the worker again
    assert not worker.is_alive() and not any(tmp_path.iterdir())  # type: ignore[attr-defined]
