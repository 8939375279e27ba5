"""Command-line options shared by several commands, declared once (`degrade` and `prepare` both
describe the degradation a model is trained for)."""

from __future__ import annotations

from typing import Annotated

import typer

from mrisr_cli.errors import InputError

FactorOption = Annotated[int, typer.Option(min=2, help="Resolution reduction per degraded axis.")]
AxesOption = Annotated[
    str, typer.Option(help="Degraded canonical (RAS) axes: 0=L-R, 1=P-A, 2=I-S.")
]
InterpolationOption = Annotated[
    str, typer.Option(help="Back onto the fine grid: linear (authors) or cubic.")
]


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
