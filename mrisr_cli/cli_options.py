"""Command-line options shared by several commands, declared once (`degrade` and `prepare` both
describe the degradation a model is trained for), and the help layout all commands share.

Typer 0.29 prints a type column in `--help` (``<bool>``, ``<str>``, ``<int range>``) that squeezes
the help text of an 80-column terminal into a narrow column. Every option therefore names its value
with ``metavar=`` in the usual style (``N``, ``FILE``, ``X,Y,Z``; click's errors name the option,
not the metavar), and on/off flags are declared with :func:`switch`: no type, and listed in a
"Switches" panel of their own, so that long names such as ``--no-keep-background`` do not narrow
the help of every option. :class:`Command` and :class:`Group` cover what ``metavar=`` cannot reach.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from mrisr_cli.errors import InputError

#: The metavar of a flag (``--overwrite``, ``--n4/--no-n4``): an empty type column.
FLAG = ""
#: The help panel of the on/off flags; the options that take a value stay under "Options".
SWITCHES = "Switches"


def switch(*param_decls: str, help: str) -> Any:
    """``typer.Option`` for an on/off flag (``switch("--n4/--no-n4", help=...)``): no type in
    ``--help``, listed under Switches."""
    return typer.Option(*param_decls, metavar=FLAG, rich_help_panel=SWITCHES, help=help)


FactorOption = Annotated[
    int, typer.Option(min=2, metavar="N", help="Resolution reduction per degraded axis.")
]
AxesOption = Annotated[
    str,
    typer.Option(metavar="LIST", help="Degraded canonical (RAS) axes: 0=L-R, 1=P-A, 2=I-S."),
]
InterpolationOption = Annotated[
    str,
    typer.Option(metavar="METHOD", help="Back onto the fine grid: linear (authors) or cubic."),
]
#: The authors' k-space windows (DegradationConfig's defaults; a test keeps them equal).
WINDOW_DEFAULT = "1.25,1.5,1/3"
WindowOption = Annotated[
    str,
    typer.Option(
        metavar="U,F,P",
        help="k-space windows (in axis sizes): inverse Hann U > 1, Hann F, power P.",
    ),
]
#: Where the thread count comes from when --threads is not given (mrisr_cli.threads).
THREADS_DEFAULT = "$SLURM_CPUS_PER_TASK, else $OMP_NUM_THREADS, else the usable CPUs"
ThreadsOption = Annotated[
    int | None, typer.Option(min=1, metavar="N", help=f"CPU threads (default: {THREADS_DEFAULT}).")
]


def _flag_help(option: Any) -> Any:
    """Typer's own ``--help`` flag, without the ``<bool>`` type no ``metavar=`` can remove."""
    if option is not None and option.metavar is None:
        option.metavar = FLAG
    return option


class _NamedArgument(TyperArgument):
    """An argument whose metavar (``HR``, ``PATHS``) names it: no type column (Typer 0.29 shows
    an argument's type even when it has a metavar, and its help says what it is)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class Command(TyperCommand):
    """A command with the help layout above (``app.command(cls=Command)``): ``--help`` and the
    arguments with a metavar show no type. If a later Typer drops these hooks, the types come back
    and nothing else changes (tests/test_cli_help.py notices)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument and param.metavar:
                param.__class__ = _NamedArgument

    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help(super().get_help_option(ctx))


class Group(TyperGroup):
    """The `mrisr` group, with the layout of :class:`Command` (``typer.Typer(cls=Group)``)."""

    def get_help_option(self, ctx: Any) -> Any:
        return _flag_help(super().get_help_option(ctx))


def parse_window(text: str) -> dict[str, float]:
    """'1.25,1.5,1/3' -> DegradationConfig's three window settings (fractions allowed)."""
    try:
        values = [float(Fraction(part.strip())) for part in text.split(",")]
    except (ValueError, ZeroDivisionError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(
            f"--window takes three positive numbers U,F,P (e.g. 1.25,1.5,1/3), got {text!r}"
        )
    if values[0] <= 1:
        raise InputError(
            f"--window: the boosting window's length U must be more than 1 (the spectrum's "
            f"size), got {text!r}"
        )
    return dict(zip(("unfilter_window", "filter_window", "window_power"), values, strict=True))


def parse_axes(text: str) -> tuple[int, ...]:
    """'0,2' -> (0, 2); anything else (no axis, a repeated one, not 0-2) is one InputError line."""
    try:
        axes = [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        axes = []
    if not axes or not all(a in (0, 1, 2) for a in axes):
        raise InputError(f"--axes takes axis numbers 0-2 separated by commas, got {text!r}")
    if len(set(axes)) != len(axes):
        raise InputError(f"--axes names an axis twice: {text!r}")
    return tuple(sorted(axes))


def parse_triple(text: str, what: str) -> tuple[int, int, int]:
    """'64,40,64' or '64x40x64' -> (64, 40, 64); anything else is one InputError line."""
    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise InputError(f"{what} takes three positive integers like 64,40,64, got {text!r}")
    return parts  # type: ignore[return-value]
