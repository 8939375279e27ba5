"""What the commands print, in one place: the one-line ``mrisr: error: ...`` reports, the turning
of library errors into them, and the progress bar every long command shows.

Kept apart from `cli.py` so that the command modules (`cli_evaluate`, `cli_train`) and `batch` can
import it at module level without importing the Typer app.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from mrisr_cli.errors import MrisrError

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3


def stderr_console() -> Console:
    # soft wrap: a message is one line in a log file (rich would break it at 80 columns there,
    # splitting long paths); a terminal wraps it for display
    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def report_line(kind: str, message: str, console: Console | None = None) -> None:
    """One ``mrisr: <kind>: <message>`` line on stderr (or on ``console``, a live display's)."""
    (console or stderr_console()).print(f"mrisr: {kind}: {message}", markup=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_USER_ERROR) -> typer.Exit:
    """Print one error line on stderr and return the Exit to raise."""
    report_line("error", message)
    return typer.Exit(code)


def warn(message: str) -> None:
    report_line("warning", message)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors (and GPU out-of-memory) into one stderr line and exit code 1."""
    try:
        yield
    except MrisrError as exc:
        raise fail(str(exc)) from None
    except MemoryError:
        raise fail("out of memory; try a smaller --batch-size or a machine with more RAM") from None
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise fail("out of GPU memory; try a smaller --batch-size or --device cpu") from None
        raise


def progress_bar(
    console: Console,
    *extra: ProgressColumn,
    transient: bool = True,
    kind: type[Progress] = Progress,
) -> Progress:
    """The commands' bar: description, bar, done/total, elapsed time, then ``extra`` columns.

    Off where ``console`` is not a terminal (a pipe, a SLURM log): there a bar shows nothing and
    leaves a blank line after the last message.
    """
    return kind(
        # no markup: descriptions hold file names, and "[1]" in one is not a style
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra,
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )
