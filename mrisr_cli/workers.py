"""Worker processes that stop with the command.

``prepare`` and ``evaluate`` run subjects in parallel processes. A plain
:class:`~concurrent.futures.ProcessPoolExecutor` leaving its ``with`` block on Ctrl-C waits for
every queued subject, so the command went on for as long as the whole job; and a terminal's Ctrl-C,
which reaches every process of the group, made each idle worker print a traceback. Here the
command's process alone decides: workers ignore SIGINT; on a stop the queued work is cancelled and
the workers get SIGTERM, which unwinds a worker's task (its atomic writes remove their temporary
files) and ends an idle worker at once. A worker deaf to it (inside a long C call such as N4) is
killed after :data:`STOP_GRACE_SECONDS`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.connection import wait as connection_wait
from types import FrameType, TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: how long stopped workers may take to unwind before they are killed
STOP_GRACE_SECONDS = 5.0
#: how long the executor's thread may take to reap the ended (or killed) workers
REAP_SECONDS = 10.0

_in_task = False  # in a worker: whether it is running a task (else it waits for one)


def _stop_worker(signum: int, frame: FrameType | None) -> None:
    """SIGTERM in a worker: unwind the running task, or end an idle worker quietly."""
    if _in_task:
        # once: a second SIGTERM (scancel signals every process, then the parent does) would
        # break off the unwinding, and with it the removal of temporary files
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt
    os._exit(128 + signum)


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent stops us
    signal.signal(signal.SIGTERM, _stop_worker)
    if initializer is not None:
        initializer(*initargs)


def _run_task(fn: Callable[..., T], *args: Any) -> T:
    global _in_task
    _in_task = True
    try:
        return fn(*args)
    except KeyboardInterrupt:  # stopped, and unwound: the parent wants no result
        os._exit(128 + signal.SIGTERM)
    finally:
        _in_task = False


class WorkerPool:
    """Spawned worker processes (no fork after OpenMP/ITK threads started) for ``with``:
    leaving the block normally waits for the work; leaving it by an exception (Ctrl-C, SIGTERM,
    an error) cancels what is queued and stops the workers before the exception goes on."""

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_start_worker,
            initargs=(initializer, initargs),
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._executor.submit(_run_task, fn, *args)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self._executor.shutdown(wait=True)
        else:
            self.stop()

    def stop(self) -> None:
        """Cancel the queued work and end the workers: SIGTERM, then SIGKILL after the grace."""
        # the executor keeps its processes in a private mapping (public from Python 3.14 on, as
        # terminate_workers()); without it, cancelling the queue is all that can be done
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        manager = getattr(self._executor, "_executor_manager_thread", None)
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()  # one that has ended already is left alone
        # waited for by their sentinels, never joined here: the executor's own thread reaps
        # them, and two threads reaping one process race (the loser takes it for alive)
        sentinels = {process.sentinel: process for process in processes}
        try:
            _wait_ended(list(sentinels), STOP_GRACE_SECONDS)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting (the first one goes on)
            pass
        finally:
            ended = set(connection_wait(list(sentinels), 0))
            for sentinel, process in sentinels.items():
                if sentinel not in ended:
                    process.kill()
            if manager is not None:  # it reaps every worker (exit codes set) and ends
                manager.join(REAP_SECONDS)


def _wait_ended(sentinels: list[Any], seconds: float) -> None:
    """Wait up to ``seconds`` until every process of these sentinels has ended."""
    deadline = time.monotonic() + seconds
    pending = sentinels
    while pending and (left := deadline - time.monotonic()) > 0:
        done = connection_wait(pending, left)
        pending = [s for s in pending if s not in done]
