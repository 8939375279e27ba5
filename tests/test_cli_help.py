"""`mrisr <command> --help` on an 80-column terminal: no Typer type column (``<bool>``,
``<path>``, ``<int range>``), short metavars instead, and a help column wide enough to read."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer import rich_utils
from typer.testing import CliRunner

from mrisr_cli.cli import app

runner = CliRunner()

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TYPE_LABEL = re.compile(r"<(?:bool|str|path|int|float|list\[|file|directory)")

#: Most lines each help page may take at 80 columns. Measured when the type column went: mrisr
#: 28, upsample 61 (68 with --bias-corrected), degrade 27, demo 24, evaluate 53, prepare 39,
#: train 95, selftest 11; before (type column, flags among the options): 28, 115, 27, 23, 82, 51,
#: 150, 11. The bounds leave room for a few more words of help, not for the old layout.
MAX_LINES = {
    "": 30,
    "upsample": 78,
    "degrade": 30,
    "demo": 27,
    "evaluate": 60,
    "prepare": 44,
    "train": 105,
    "selftest": 13,
}


@pytest.fixture(autouse=True)
def _width_from_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Typer reads TERMINAL_WIDTH once, when typer.rich_utils is first imported, and then it
    overrides COLUMNS for the rest of the process; rich reads COLUMNS each time Typer makes a
    console. Clear the former so that the COLUMNS given below decides, whatever ran before."""
    monkeypatch.setattr(rich_utils, "MAX_WIDTH", None, raising=False)


def help_page(command: str) -> str:
    args = [command, "--help"] if command else ["--help"]
    result = runner.invoke(app, args, env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.output)


@pytest.mark.parametrize("command", list(MAX_LINES))
def test_help_has_no_type_column_and_fits(command: str) -> None:
    text = help_page(command)
    lines = text.splitlines()
    assert max(len(line) for line in lines) == 80  # rendered for 80 columns, not wider
    assert not TYPE_LABEL.search(text), TYPE_LABEL.findall(text)
    assert "<>" not in text and "[]" not in text  # empty metavars leave no stray brackets
    assert len(lines) <= MAX_LINES[command], text


@pytest.mark.parametrize("command", list(MAX_LINES))
def test_option_help_column_is_wide(command: str) -> None:
    """Where the --help row's text starts is where every option's help starts in its panel:
    at least 34 of the 80 columns are left for it (18 to 23 in the largest commands before)."""
    rows = [line for line in help_page(command).splitlines() if "--help" in line]
    assert len(rows) == 1
    assert rows[0].index("Show this message and exit.") <= 45, rows[0]


@pytest.mark.parametrize(
    ("command", "option", "metavar"),
    [
        ("upsample", "--alpha", "A[,A...]"),
        ("upsample", "--psnr-weights", "FILE"),
        ("upsample", "--batch-size", "N [x>=1]"),
        ("upsample", "--patch", "X,Y,Z"),
        ("upsample", "--device", "DEVICE"),
        ("degrade", "--axes", "LIST"),
        ("evaluate", "--pred", "DIR"),
        ("train", "--net-params", "JSON"),
    ],
)
def test_options_show_their_metavar(command: str, option: str, metavar: str) -> None:
    text = help_page(command)
    assert re.search(rf"│[ *]+{re.escape(option)} +{re.escape(metavar)} ", text), text


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("", ["--version", "--help"]),
        (
            "upsample",
            [
                "--n4",
                "--bias-corrected",
                "--keep-background",
                "--half",
                "--compile",
                "--overwrite",
                "--help",
            ],
        ),
        ("evaluate", ["--tissue", "--n4", "--overwrite", "--help"]),
        ("train", ["--amp", "--checkpointing", "--compile", "--resume", "--deterministic"]),
    ],
)
def test_flags_show_no_type(command: str, flags: list[str]) -> None:
    """A flag's row goes straight from its names to its help; the on/off flags of a command are
    listed under Switches, away from the options that take a value (--help stays with those)."""
    click_command = typer.main.get_command(app)
    if command:
        click_command = click_command.commands[command]  # type: ignore[attr-defined]
    helps = {param.opts[0]: param.help for param in click_command.params if param.opts[0] in flags}
    helps["--help"] = "Show this message and exit."
    text = help_page(command)
    for flag in flags:
        start = re.escape(helps[flag][:12])
        assert re.search(rf"│[ *]+{flag}(?: +--no-[a-z0-9-]+)? +{start}", text), (flag, text)
    if command:
        switches = text[text.index("─ Switches ") :]
        assert all(f" {flag} " in switches for flag in flags if flag != "--help")
        assert " --help " not in switches
