"""N4 (ANTsPy) keeps the scan's units whatever they are, and removes a smooth field."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mrisr_cli import n4
from mrisr_cli.errors import MrisrError
from mrisr_cli.n4 import N4_RANGE, n4_correct, n4_fit, n4_in_child_process
from tests.test_prepare import SHAPE, head

SPACING = (1.0, 1.0, 1.0)


def biased_head() -> tuple[np.ndarray, np.ndarray]:
    """A head and the same head under a smooth field (0.75 to 1.25 along the first axis)."""
    clean = head(0)
    field = np.linspace(0.75, 1.25, SHAPE[0], dtype=np.float32)[:, None, None]
    return clean, clean * field


@pytest.fixture(scope="module")
def unit_correction() -> np.ndarray:
    """N4 of the biased head in its own units (0 to ~180): computed once, the reference."""
    return n4_correct(biased_head()[1], SPACING)


def check_keeps_units_and_flattens(
    clean: np.ndarray, biased: np.ndarray, fixed: np.ndarray
) -> None:
    """A [0, 1] scan once came back negative and inverted (a "+1" shift dominated it)."""
    inside = clean > 120  # the flat innermost shell
    assert fixed.min() > -0.02 * biased.max()
    assert abs(fixed.mean() / biased.mean() - 1.0) < 0.05
    assert np.corrcoef(fixed.ravel(), biased.ravel())[0, 1] > 0.95
    spread = lambda v: float(v[inside].std() / v[inside].mean())  # noqa: E731
    print(f"within-tissue spread {spread(biased):.3f} -> {spread(fixed):.3f}")
    assert spread(fixed) < 0.85 * spread(biased)


def test_n4_keeps_units_and_flattens_a_field(unit_correction: np.ndarray) -> None:
    clean, biased = biased_head()
    check_keeps_units_and_flattens(clean, biased, unit_correction)


@pytest.mark.parametrize("units", [1.0 / 255.0, 40.0])
def test_n4_gives_the_same_correction_in_any_units(
    units: float, unit_correction: np.ndarray
) -> None:
    """The scan in [0, ~0.7] (1/255) or [0, ~7100] (x40): the correction of the scan in its own
    units, scaled."""
    clean, biased = biased_head()
    fixed = n4_correct(biased * units, SPACING)
    check_keeps_units_and_flattens(clean, biased * units, fixed)
    assert np.abs(fixed / units - unit_correction).max() < 0.01 * unit_correction.max()


@pytest.mark.parametrize("span", [1e-30, 3e38])
def test_n4_is_computed_where_float32_would_fail(span: float) -> None:
    """A float32 volume spanning +-1.5e38 overflowed in the shift; one spanning 1e-30 was rounded
    to a constant and came back as zeros."""
    clean = head(0).astype(np.float64)
    volume = (clean / clean.max() * span - span / 2).astype(np.float32)
    fixed = n4_correct(volume, (1.0, 1.0, 1.0))
    assert np.isfinite(fixed).all()
    assert np.corrcoef(fixed.ravel().astype(np.float64), volume.ravel())[0, 1] > 0.95


def test_n4_of_a_constant_image_is_the_image() -> None:
    np.testing.assert_array_equal(n4_correct(np.full((8, 8, 8), 5.0), (1.0, 1.0, 1.0)), 5.0)


def test_the_fitted_field_follows_the_bias_and_restores_it() -> None:
    """upsample removes N4's field before the network and puts it back after: the field must be
    the bias that was applied, and putting it back must give the biased input again."""
    clean, biased = biased_head()
    fit = n4_fit(biased, SPACING)
    np.testing.assert_allclose(fit.restore(fit.remove(biased)), biased, rtol=1e-5, atol=1e-3)
    # the field rises along the first axis: upper half / lower half of the head, 1.19 applied
    head_mask = clean > 20
    applied = np.linspace(0.75, 1.25, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    upper, lower = head_mask & (applied > 1), head_mask & (applied < 1)
    rise = lambda v: float(v[upper].mean() / v[lower].mean())  # noqa: E731
    gain = np.broadcast_to(fit.gain, SHAPE)
    print(f"rise of the field: applied {rise(applied):.3f}, fitted {rise(gain):.3f}")
    assert rise(gain) > 1.1 and abs(rise(gain) / rise(applied) - 1.0) < 0.05
    # a result made from the corrected head gets the input's shading back, not a flat one
    shading = np.where(head_mask, fit.restore(clean) / np.maximum(clean, 1.0), 0.0)
    assert abs(rise(shading) - rise(gain)) < 0.02


def test_n4_correct_is_the_image_ants_corrects(unit_correction: np.ndarray) -> None:
    """n4_correct divides by the field ANTs returns; ANTs's own corrected image, moved back to the
    input's units as mrisr did before it kept the field, must be the same. (``unit_correction``
    is n4_correct of this very biased head, computed once for the module.)"""
    import ants

    _, biased = biased_head()
    floor, span = float(biased.min()), float(biased.max() - biased.min())
    scale = N4_RANGE / span
    shifted = ((biased.astype(np.float64) - floor) * scale + 1.0).astype(np.float32)
    image = ants.from_numpy(shifted, spacing=SPACING)
    corrected = ants.n4_bias_field_correction(image).numpy().astype(np.float64)
    corrected *= shifted.mean(dtype=np.float64) / corrected.mean()
    expected = (corrected - 1.0) / scale + floor
    np.testing.assert_allclose(unit_correction, expected, atol=1e-5 * span)


#: an N4 that runs for long: 10^4 iterations, about 5 ms each on one core for these heads
LONG_N4 = {"iters": [10_000], "tol": 0.0}


_BOTH_WAYS = """
import numpy as np
from mrisr_cli.n4 import n4_fit, n4_in_child_process
from mrisr_cli.threads import configure_threads
from tests.test_prepare import head
configure_threads(1)  # before ANTs starts, on both sides: N4's field depends on ITK's threads
small = head(0, (24, 22, 26))
here = n4_fit(small, (1.0, 1.0, 1.0))
with n4_in_child_process():
    there = n4_fit(small, (1.0, 1.0, 1.0))
same = (there.floor, there.scale) == (here.floor, here.scale)
print(float(np.abs(there.gain - here.gain).max()), same)
"""


def test_n4_in_a_child_process_gives_the_same_field() -> None:
    """`mrisr upsample` fits N4 in a child process: the field it fits in this process, bit for
    bit, with the same thread count (in a fresh interpreter: here ANTs may have started with
    another)."""
    repo = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-c", _BOTH_WAYS], cwd=repo, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0.0", "True"]


def test_n4_in_a_child_process_is_reused_and_passes_errors_on() -> None:
    """One child for every input, killed when the block ends; ANTs's errors come back as they
    were raised."""
    small = head(0, (24, 22, 26))
    with n4_in_child_process():
        n4_fit(small, SPACING)
        assert n4._child is not None
        child = n4._child._process
        with pytest.raises(RuntimeError, match="outside the largest possible region"):
            n4_fit(small, SPACING, mask=np.ones((8, 8, 8)))
        again = n4_fit(small[::-1], SPACING)
        assert n4._child._process is child is not None, "one child for every input"
    assert again.gain.shape == small.shape
    assert n4._child is None and child.exitcode is not None, "the child is gone"


class _Stopped(Exception):
    """What the test's signal handler raises, as the CLI's raises KeyboardInterrupt."""


def _signal_once_n4_runs(signum: int, *, to_child: bool) -> dict[str, Any]:
    """Send ``signum`` to this process or to the N4 child 3 s after the child started (its ANTs
    import done, N4 running); the child and the time go into the returned dict."""
    seen: dict[str, Any] = {}

    def run() -> None:
        deadline = time.monotonic() + 120.0  # never a stray signal into a later test
        while n4._child is None or n4._child._process is None:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        seen["child"] = child = n4._child._process
        time.sleep(3.0)
        seen["sent"] = time.monotonic()
        os.kill(child.pid if to_child else os.getpid(), signum)  # type: ignore[arg-type]

    threading.Thread(target=run, daemon=True).start()
    return seen


def test_a_stop_during_n4_is_acted_on_at_once_and_kills_the_child() -> None:
    """ANTs's N4 runs minutes of C++ during which Python runs no signal handler: in the main
    process, a SIGTERM waited for it (minutes on a whole head), past SLURM's and Docker's
    SIGKILL. In the child, the handler runs at once and the child is killed."""
    from mrisr_cli.threads import configure_threads

    configure_threads(1)

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        seen = _signal_once_n4_runs(signal.SIGUSR1, to_child=False)
        with pytest.raises(_Stopped), n4_in_child_process():
            n4_fit(head(0), SPACING, convergence=LONG_N4)
        stopped = time.monotonic()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    late = stopped - seen["sent"]
    assert late < 2.0, f"stopped {late:.1f} s after the signal"
    assert seen["child"].exitcode == -signal.SIGKILL, "killed, not left to finish N4"


def test_a_child_killed_during_n4_is_one_error() -> None:
    """The kernel's OOM killer ends the child: an error, not a hang or a traceback."""
    from mrisr_cli.threads import configure_threads

    configure_threads(1)
    _signal_once_n4_runs(signal.SIGKILL, to_child=True)
    with (
        pytest.raises(MrisrError, match=r"N4's process ended .*killed by SIGKILL"),
        n4_in_child_process(),
    ):
        n4_fit(head(0), SPACING, convergence=LONG_N4)
    assert n4._child is None
