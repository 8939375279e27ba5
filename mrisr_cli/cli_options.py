"""Command-line options shared by several commands, declared once (`degrade` and `prepare` both
describe the degradation a model is trained for)."""

from __future__ import annotations

from typing import Annotated

import typer

from mrisr_cli.errors import InputError

FactorOption = Annotated[int, typer.Option(min=1, help="Resolution reduction per degraded axis.")]
AxesOption = Annotated[
    str, typer.Option(help="Degraded canonical (RAS) axes: 0=L-R, 1=P-A, 2=I-S.")
]
InterpolationOption = Annotated[
    str, typer.Option(help="Back onto the fine grid: linear (authors) or cubic.")
]


def parse_axes(text: str) -> tuple[int, ...]:
    """'0,2' -> (0, 2); anything else is one InputError line."""
    try:
        return tuple(sorted({int(a) for a in text.split(",") if a.strip()}))
    except ValueError:
        raise InputError(
            f"--axes takes axis numbers 0-2 separated by commas, got {text!r}"
        ) from None


def parse_triple(text: str, what: str) -> tuple[int, int, int]:
    """'64,40,64' or '64x40x64' -> (64, 40, 64); anything else is one InputError line."""
    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise InputError(f"{what} takes three positive integers like 64,40,64, got {text!r}")
    return parts  # type: ignore[return-value]
