"""N4 bias-field correction through ANTsPy (Tustison et al. 2010).

ANTsPy is imported lazily: it is heavy and only needed when N4 is asked for.

The shrink factor and convergence settings are ANTsPy's defaults (shrink 4, 4 levels of 50
iterations, tolerance 1e-7): no setting several times faster kept the corrected image within 1%
of theirs, and a looser tolerance is no faster, since the iteration limit is always reached
(``benchmarks/bench_upsample.py --parts n4``, figures in docs/speed.md); and the training data
were prepared with them.

ANTs's N4 is minutes of C++ on a whole head, during which Python runs no signal handler: inside
:func:`n4_in_child_process` (``mrisr upsample``) it runs in a child process instead, so that
Ctrl-C and SIGTERM stop the command at once, before SLURM's or Docker's SIGKILL.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

from mrisr_cli.errors import MrisrError

#: The intensity span N4 sees (the volume is rescaled to [1, 1 + N4_RANGE] and back).
N4_RANGE = 1000.0
#: Shrink factor of the image N4 fits its B-spline field on.
N4_SHRINK = 4
#: Iterations per fitting level and the convergence tolerance.
N4_CONVERGENCE: dict[str, Any] = {"iters": [50, 50, 50, 50], "tol": 1e-7}


@dataclass(frozen=True, eq=False)  # arrays: no meaningful == or hash
class BiasField:
    """A fitted N4 field: removed from the volume it was fitted on, and put back into a result on
    the same grid (``mrisr upsample`` feeds the network corrected intensities, as it was trained,
    and gives back the input's shading unless asked for the corrected image).

    N4 divides by a smooth field on positive intensities, so both directions work on the volume
    moved to [1, 1 + N4_RANGE] (``(x - floor) * scale + 1``): ``remove`` divides by ``gain`` there,
    ``restore`` multiplies, and ``restore(remove(x)) == x`` up to rounding.
    """

    gain: np.ndarray  # > 0, float32; N4's field over the ratio that keeps the input's level
    floor: float
    scale: float

    def _shifted(self, data: np.ndarray) -> np.ndarray:
        return (np.asarray(data, dtype=np.float64) - self.floor) * self.scale + 1.0

    def _unshifted(self, shifted: np.ndarray) -> np.ndarray:
        return ((shifted - 1.0) / self.scale + self.floor).astype(np.float32)

    def remove(self, data: np.ndarray) -> np.ndarray:
        """The bias-corrected volume (float32, the input's units on average)."""
        return self._unshifted(self._shifted(data) / self.gain)

    def restore(self, data: np.ndarray) -> np.ndarray:
        """A corrected volume (or a result made from one) with the field put back (float32)."""
        return self._unshifted(self._shifted(data) * self.gain)


def n4_fit(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    mask: np.ndarray | None = None,
    shrink_factor: int = N4_SHRINK,
    convergence: dict[str, Any] | None = None,
) -> BiasField:
    """Fit N4's bias field to ``data`` (its :meth:`BiasField.remove` is :func:`n4_correct`)."""
    # N4 models a multiplicative field on positive intensities. The volume is moved to
    # [1, 1 + N4_RANGE] first, whatever its units: a bare "+1" shift of a scan stored in [0, 1]
    # made the offset dominate, and N4 returned a negative, inverted image (seen on a real one).
    # in float64: a float32 volume spanning +-3e38 would overflow in float32, and one spanning
    # 1e-30 would be rounded away
    values = np.asarray(data, dtype=np.float64)
    floor = float(values.min())
    span = float(values.max()) - floor
    if span <= 0:  # a constant image has no field to correct
        return BiasField(gain=np.ones((), dtype=np.float32), floor=floor, scale=1.0)
    scale = N4_RANGE / span
    shifted = np.ascontiguousarray((values - floor) * scale + 1.0, dtype=np.float32)
    request = (
        shifted,
        tuple(float(s) for s in spacing),
        None if mask is None else mask.astype(np.float32),
        shrink_factor,
        dict(convergence or N4_CONVERGENCE),
    )
    field = _child.field(request) if _child is not None else _ants_field(*request)
    # the field is known up to a constant factor: keep the input's overall level (its units)
    corrected_mean = float((shifted / field).mean(dtype=np.float64))
    level = float(shifted.mean(dtype=np.float64)) / max(corrected_mean, 1e-12)
    # float32 (held while the network runs: 4 bytes a voxel); its rounding, 6e-8, is far below
    # the network's error
    return BiasField(gain=(field / np.float32(level)).astype(np.float32), floor=floor, scale=scale)


def n4_correct(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    mask: np.ndarray | None = None,
    shrink_factor: int = N4_SHRINK,
    convergence: dict[str, Any] | None = None,
) -> np.ndarray:
    """Return the bias-corrected volume (same shape, float32, same units on average)."""
    field = n4_fit(data, spacing, mask=mask, shrink_factor=shrink_factor, convergence=convergence)
    return field.remove(data)


def _ants_field(
    shifted: np.ndarray,
    spacing: tuple[float, ...],
    mask: np.ndarray | None,
    shrink_factor: int,
    convergence: dict[str, Any],
) -> np.ndarray:
    """ANTs's N4 field of a volume of positive intensities (in this process or the child)."""
    try:
        import ants
    except ImportError as exc:  # pragma: no cover - antspyx is a declared dependency
        raise MrisrError("N4 needs ANTsPy: pip install antspyx (or run with --no-n4)") from exc
    image = ants.from_numpy(shifted, spacing=spacing)
    ants_mask = None if mask is None else ants.from_numpy(mask, spacing=image.spacing)
    # ANTs writes the corrected image as the input divided by this field (checked: identical)
    return ants.n4_bias_field_correction(
        image,
        mask=ants_mask,
        shrink_factor=shrink_factor,
        convergence=convergence,
        return_bias_field=True,
    ).numpy()


class _N4Child:
    """A spawned process (no fork of a process whose torch/OpenMP threads run) that fits N4
    fields on request, started at the first one. It writes nothing, so a stop kills it at once:
    there is nothing for it to clean up, and SIGTERM would wait for N4 to return."""

    def __init__(self) -> None:
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None

    def field(self, request: tuple[Any, ...]) -> np.ndarray:
        if self._process is None or self._connection is None:
            context = get_context("spawn")
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, os.getpid()), name="mrisr-n4")
            try:
                process.start()
            except BaseException:  # a stop while it starts: none is left running
                ours.close()
                with suppress(Exception):  # not started yet: nothing to kill
                    process.kill()
                    process.join()
                raise
            finally:
                theirs.close()
            self._process, self._connection = process, ours
        try:
            self._connection.send(request)
            ok, value = self._connection.recv()
        except (EOFError, OSError) as exc:  # it died: the kernel's OOM killer, say
            self._process.join(1.0)
            code = self._process.exitcode
            self.close()
            how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"code {code}"
            message = f"N4's process ended without a result ({how}; out of memory?)"
            raise MrisrError(message) from exc
        except BaseException:  # a stop (KeyboardInterrupt from the signal handler)
            self.close()
            raise
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Kill the process (idle or inside N4) and wait for it: it leaves nothing behind."""
        process, self._process = self._process, None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join()


#: the child that fits N4 fields inside :func:`n4_in_child_process` (None: this process does)
_child: _N4Child | None = None


@contextmanager
def n4_in_child_process() -> Iterator[None]:
    """Within the block, :func:`n4_fit` runs ANTs in one child process (spawned at the first fit,
    about a second, and reused), so that a signal handler of this process runs at once during
    N4; leaving the block, by a stop too, kills the child."""
    global _child
    child, previous = _N4Child(), _child
    _child = child
    try:
        yield
    finally:
        _child = previous
        child.close()


def _serve(connection: Connection, parent: int) -> None:
    """The child: fit each field asked for until the pipe closes. Only the parent stops it:
    Ctrl-C (sent to the terminal's whole process group) and SIGTERM (SLURM signals every process
    of a job step) are ignored here, so the command reports its stop once, and the parent kills
    the child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with suppress(Exception):  # Linux: die with a parent that is SIGKILLed (no time to kill us)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl
        return
    while True:
        try:
            request = connection.recv()
        except EOFError:  # the parent is done (or gone)
            return
        try:
            reply: tuple[bool, Any] = (True, _ants_field(*request))
        except Exception as exc:
            reply = (False, exc)
        try:
            connection.send(reply)
        except Exception:  # an exception that does not pickle (or the parent is gone)
            error = reply[1]
            with suppress(Exception):
                connection.send((False, MrisrError(f"N4 failed: {type(error).__name__}: {error}")))
