"""`mrisr evaluate`: the paper's Table 1 (SSIM, PSNR, NRMSE, M_h, Dice) for a user's own data.

A thin Typer command: it parses, calls :mod:`mrisr_cli.evaluation` (and
:mod:`mrisr_cli.evaluation_report` for --out), shows a progress bar and the table, and prints one
line per pair that could not be evaluated. Heavy imports stay inside the function so that
`mrisr --help` is instant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from mrisr_cli.cli_options import THREADS_DEFAULT, switch
from mrisr_cli.console import progress_bar, report_line, stderr_console, user_errors

if TYPE_CHECKING:
    from mrisr_cli.evaluation_results import Evaluation


def evaluate_command(
    ref: Annotated[
        Path,
        typer.Option(
            "--ref",
            metavar="DIR",
            help="Folder of reference (high-resolution) volumes.",
            show_default=False,
        ),
    ],
    pred: Annotated[
        list[Path],
        typer.Option(
            "--pred",
            metavar="DIR",
            help="Folder of predictions, matched to --ref by file name; repeat it to compare "
            "methods in one table (exactly two: also a paired t-test). A folder of several "
            "alphas (upsample --alpha: NAME_alpha-A) is one method per alpha.",
            show_default=False,
        ),
    ],
    mask: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Folder of brain masks matched by name (default: the reference's foreground).",
        ),
    ] = None,
    parcellation_weights: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="HighRes3DNet weights (.safetensors or PyTorch state dict) for M_h and "
            "parcellation Dice; without it those columns are left out.",
        ),
    ] = None,
    parcellation_context: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="Voxels of context HighRes3DNet sees around its tiles and the mask's box: 43, "
            "its receptive radius, equals one pass over the box at several times the memory "
            "and time; less approximates it (docs/evaluate.md).",
        ),
    ] = 8,
    tissue: Annotated[
        bool,
        switch("--tissue/--no-tissue", help="Dice of 3-class tissue segmentations."),
    ] = True,
    n4: Annotated[
        bool,
        switch(
            "--n4/--no-n4",
            help="N4 bias correction before tissue and M_h (paper: on).",
        ),
    ] = True,
    out: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Write subjects.csv, summary.json, figures/*.png and (with weights) "
            "parcellation_dice.csv here.",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1, metavar="N", help="Subjects evaluated in parallel (CPU worker processes)."
        ),
    ] = 1,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help=f"CPU threads in all, shared by the --jobs workers (default: {THREADS_DEFAULT}).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, switch("--overwrite", help="Replace existing report files.")
    ] = False,
) -> None:
    """Compare super-resolved volumes with their references: mrisr evaluate --ref hr --pred sr"""
    with user_errors():
        from mrisr_cli.threads import configure_threads

        configure_threads(threads)
        evaluation = _run(
            ref,
            pred,
            mask,
            parcellation_weights,
            parcellation_context,
            tissue,
            n4,
            out,
            jobs,
            device,
            overwrite,
        )
    if not evaluation.evaluated:
        report_line("error", "no pair could be evaluated")
        raise typer.Exit(1)


def _run(
    ref: Path,
    pred: list[Path],
    mask: Path | None,
    weights: Path | None,
    context: int,
    tissue: bool,
    n4: bool,
    out: Path | None,
    jobs: int,
    device: str,
    overwrite: bool,
) -> Evaluation:
    from mrisr_cli.evaluation import EvaluationOptions, check_inputs, evaluate
    from mrisr_cli.evaluation_report import check_report_target, write_report
    from mrisr_cli.fidelity import read_label_names
    from mrisr_cli.inference import resolve_device
    from mrisr_cli.n4 import n4_in_child_process

    if out is not None:
        check_report_target(out, overwrite=overwrite)
    resolved = resolve_device(device)
    options = EvaluationOptions(
        weights=weights, tissue=tissue, n4=n4, device=resolved, border=context, margin=context
    )
    planned = check_inputs(ref, pred, mask, options)  # fatal problems before the progress bar
    console = stderr_console()
    with progress_bar(console) as bar:
        task = bar.add_task("evaluating", total=None)

        def progress(subject: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"evaluated {subject}")

        # N4 fitted here (one job) runs in a child process, so that a stop is acted on at once
        with n4_in_child_process():
            evaluation = evaluate(
                ref,
                pred,
                mask_dir=mask,
                options=options,
                jobs=jobs,
                progress=progress,
                planned=planned,
            )
    pair_notes = {note for result in evaluation.results for note in result.notes}
    for note in evaluation.notes:  # a pair's notes (scale, HighRes3DNet) question its scores
        report_line("warning" if note in pair_notes else "note", note)
    for result in evaluation.errors:
        report_line("error", f"{result.method}/{result.subject}: {result.error}")
    if evaluation.evaluated:
        # Piped or captured output gets a wide table: numbers must never be cut to fit 80 columns.
        stdout = Console(highlight=False)
        if not stdout.is_terminal:
            stdout = Console(highlight=False, width=max(stdout.width, 200))
        stdout.print(results_table(evaluation))
    if out is not None:
        names = read_label_names(weights) if weights else {}
        written = write_report(evaluation, out, overwrite=overwrite, label_names=names)
        console.print(f"wrote {len(written)} report files to {out}", highlight=False)
    return evaluation


def _format(value: float, std: float, key: str) -> str:
    digits = 2 if key.startswith("psnr") else 4
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "–"
    text = f"{value:.{digits}f}"
    return text + (f"\n± {std:.{digits}f}" if math.isfinite(std) else "")


def results_table(evaluation: Evaluation) -> Table:
    """Table 1 of Wang et al. 2020: a row per method, mean ± std per metric, and with exactly
    two methods the p-values and the better method where the difference is significant."""
    from mrisr_cli.evaluation_stats import SIGNIFICANCE_LEVEL

    title, caption = "mean ± std over subjects", None
    if evaluation.comparison:  # only with exactly two methods
        title += "; p: paired two-tailed t-test"
        caption = (
            f"better: the method with the better mean where p < {SIGNIFICANCE_LEVEL:g}; "
            "n.s.: no significant difference"
        )
        if any(m.higher_is_better is None for m in evaluation.metrics):
            caption += "; differ: significant, no better direction"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("method")
    table.add_column("n", justify="right")
    for metric in evaluation.metrics:
        table.add_column(f"{metric.label} {metric.direction}", justify="right", overflow="fold")
    for name in evaluation.methods:
        stats = evaluation.summary[name]
        evaluated = sum(1 for r in evaluation.results if r.method == name and not r.error)
        cells = [_format(stats[m.key].mean, stats[m.key].std, m.key) for m in evaluation.metrics]
        table.add_row(name, str(evaluated), *cells, end_section=True)
    if evaluation.comparison:
        p_cells, better_cells = [], []
        for metric in evaluation.metrics:
            test = evaluation.comparison[metric.key]
            p_cells.append(f"{test.p:.3g}" if math.isfinite(test.p) else "–")
            if test.better:
                better_cells.append(test.better)
            elif test.significant:  # a metric without a better direction (HF power)
                better_cells.append("differ")
            else:  # no test (fewer than 2 subjects, equal means) or not significant
                better_cells.append("n.s." if math.isfinite(test.p) else "–")
        n = max((t.n for t in evaluation.comparison.values()), default=0)
        table.add_row("p-value", str(n), *p_cells, end_section=False)
        table.add_row("better", "", *better_cells)
    return table
