"""The `mrisr` command line: parse, validate, call library functions, report.

Heavy imports (torch, ANTs) happen inside the commands so that `mrisr --help` is instant. Every
:class:`~mrisr_cli.errors.MrisrError` becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mrisr_cli import __version__
from mrisr_cli.cli_evaluate import evaluate_command
from mrisr_cli.cli_options import (
    FLAG,
    WINDOW_DEFAULT,
    AxesOption,
    Command,
    FactorOption,
    Group,
    InterpolationOption,
    ThreadsOption,
    WindowOption,
    parse_axes,
    parse_triple,
    parse_window,
    switch,
)
from mrisr_cli.console import (
    EXIT_INTERNAL_ERROR,
    EXIT_USER_ERROR,
    fail,
    progress_bar,
    report_line,
    stderr_console,
    stdout_console,
    user_errors,
    warn,
)
from mrisr_cli.errors import MrisrError

if TYPE_CHECKING:  # imports torch: only inside the command
    from mrisr_cli.batch import Plan

app = typer.Typer(
    name="mrisr",
    help="3D brain MRI super-resolution (RRDG generator, patch-GAN, PSNR/GAN blending).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)


def _version(value: bool) -> None:
    if value:
        print(f"mrisr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, metavar=FLAG, help="Print the version."
        ),
    ] = False,
) -> None:
    """3D brain MRI super-resolution."""


def _parse_alphas(text: str) -> list[float]:
    try:
        parts = text.split(",")
        if any(not part.strip() for part in parts):  # "0,,1" or "0.5,": a value left out?
            raise ValueError
        values = [float(part) for part in parts]
    except ValueError:
        raise fail(f"--alpha takes numbers in [0, 1] separated by commas, got {text!r}") from None
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise fail(f"--alpha must lie in [0, 1] (1 = PSNR model, 0 = GAN model), got {text!r}")
    return values


@app.command(cls=Command)
def upsample(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Input image(s) or folder(s), then the output file (one input) or folder "
            "(a missing folder: end it with /).",
            show_default=False,
            metavar="PATHS",
        ),
    ],
    alpha: Annotated[
        str,
        typer.Option(
            metavar="A[,A...]",
            help="Blend theta = alpha*PSNR + (1-alpha)*GAN (equation 3 of the paper, not its "
            "Fig. 5): 1 = PSNR model (most faithful), 0 = GAN model (most texture). Several, "
            "e.g. 0,0.5,1, write one output each.",
        ),
    ] = "1",
    psnr_weights: Annotated[
        Path | None, typer.Option(metavar="FILE", help="PSNR-stage weights (.safetensors).")
    ] = None,
    gan_weights: Annotated[
        Path | None, typer.Option(metavar="FILE", help="GAN-stage weights (.safetensors).")
    ] = None,
    n4: Annotated[
        bool | None,
        switch(
            "--n4/--no-n4",
            help="N4 bias correction first (default: as the model was trained). The network "
            "sees the corrected input; the output gets the input's bias field back.",
        ),
    ] = None,
    bias_corrected: Annotated[
        bool,
        switch(
            "--bias-corrected",
            help="With N4: write the bias-corrected output instead of putting the input's "
            "field back.",
        ),
    ] = False,
    keep_background: Annotated[
        bool,
        switch(
            "--keep-background/--no-keep-background",
            help="Keep the input's flat background (voxels at its minimum that reach the "
            "image's faces, e.g. the zeros around a skull-stripped brain) instead of the "
            "network's output there; --no-keep-background: the network's output everywhere, "
            "tiles of only air included.",
        ),
    ] = True,
    device: Annotated[
        str, typer.Option(metavar="DEVICE", help="auto, cpu or cuda (cuda:N).")
    ] = "auto",
    half: Annotated[
        bool,
        switch(
            "--half",
            help="Half precision: fp16 on CUDA, bf16 on CPU (fp32, with a warning, on a CPU "
            "without native bf16).",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, metavar="N", help="Patches per network call.")
    ] = 4,
    patch: Annotated[
        str, typer.Option(metavar="X,Y,Z", help="Patch size, model's axes (README).")
    ] = "64,40,64",
    threads: ThreadsOption = None,
    margin: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="Voxels cropped from every face of each output patch, where the network lacks "
            "context (the paper: 3). 6 is near seamless for 1.4-1.5x the time (docs/speed.md).",
        ),
    ] = 3,
    overlap: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="Voxels shared by neighbouring patch cores, blended linearly to hide seams (0: "
            "the paper's stitching). 8 costs 1.76x the time and hides less than --margin 6 "
            "(docs/speed.md).",
        ),
    ] = 0,
    compile_network: Annotated[
        bool,
        switch(
            "--compile",
            help="torch.compile the network (slow start; for many volumes).",
        ),
    ] = False,
    overwrite: Annotated[bool, switch("--overwrite", help="Replace existing outputs.")] = False,
    skip_existing: Annotated[
        bool,
        switch(
            "--skip-existing",
            help="Skip outputs an earlier run finished (their sidecar records the same input "
            "file, alpha, weights and settings), to resume a batch; other existing outputs are "
            "errors.",
        ),
    ] = False,
) -> None:
    """Super-resolve T1-weighted volumes: mrisr upsample in.nii.gz out.nii.gz --alpha 0.5"""
    alphas = _parse_alphas(alpha)
    with user_errors():
        patch_size = parse_triple(patch, "--patch")
    if len(paths) < 2:  # a missing argument: a usage error (exit 2), as click's own
        raise typer.BadParameter("give at least one input and an output", param_hint="'PATHS'")
    core = min(patch_size) - 2 * margin
    if core < 1:
        raise fail(f"--patch {patch} leaves no core after cropping --margin {margin} per face")
    if overlap >= core:
        raise fail(f"--overlap {overlap} must be below the patch core ({core} voxels)")
    from mrisr_cli.tiling import slow_tiling_warning

    if slow := slow_tiling_warning(patch_size, margin, overlap):
        warn(slow)
    if skip_existing and overwrite:
        raise fail("--skip-existing keeps finished outputs and --overwrite replaces them: give one")
    if bias_corrected and n4 is False:
        raise fail("--bias-corrected writes N4's corrected output: it cannot go with --no-n4")
    plan: Plan | None = None
    try:
        with user_errors():
            from mrisr_cli.batch import plan_jobs, run_upsample_jobs, split_finished
            from mrisr_cli.inference import InferenceOptions, resolve_device, resolve_half
            from mrisr_cli.n4 import n4_in_child_process
            from mrisr_cli.pipeline import UpsampleOptions, load_generator_files
            from mrisr_cli.threads import configure_threads

            configure_threads(threads)
            plan = plan_jobs(
                [Path(p) for p in paths[:-1]],
                Path(paths[-1]),
                alphas,
                overwrite=overwrite,
                output_is_folder=paths[-1].endswith(("/", os.sep)),
                skip_existing=skip_existing,
            )
            jobs = plan.jobs
            resolved = resolve_device(device)
            half, half_warning = resolve_half(resolved, half)
            if half_warning:
                warn(half_warning)
            files = load_generator_files(psnr_weights, gan_weights)
            file_warnings = files.warnings()
            for message in file_warnings:
                warn(message)
            options = UpsampleOptions(
                inference=InferenceOptions(
                    patch=patch_size,
                    margin=margin,
                    batch_size=batch_size,
                    device=resolved,
                    half=half,
                    overlap=overlap,
                    compile=compile_network,
                ),
                n4=n4,
                bias_corrected=bias_corrected,
                keep_background=keep_background,
                overwrite=overwrite,
                run_warnings=((half_warning,) if half_warning else ()) + tuple(file_warnings),
            )
            failures, known_sha256 = 0, {}
            if skip_existing:
                resume = split_finished(jobs, files, options)
                for job in resume.finished:
                    report_line(
                        "skipped", f"{job.output}: finished by an earlier run of {job.input}"
                    )
                for _job, reason in resume.refused:
                    report_line("error", reason)
                jobs, failures = resume.to_run, len(resume.refused)
                known_sha256 = resume.input_sha256
            if jobs:
                # one console for the progress bar and the lines printed while it runs, so that
                # on a terminal rich prints them above the bar instead of through it
                console = stderr_console()
                # N4 (minutes of C++, deaf to signals) in a child: a stop is acted on at once
                with n4_in_child_process():
                    failures += run_upsample_jobs(
                        jobs,
                        files,
                        options,
                        console=console,
                        warn=lambda message: report_line("warning", message, console),
                        error=lambda message: report_line("error", message, console),
                        input_sha256=known_sha256,
                        skipped=(
                            (lambda message: report_line("skipped", message, console))
                            if skip_existing
                            else None
                        ),
                    )
    finally:  # an error, or nothing written: a folder made by this run is removed again
        if plan is not None:
            plan.release()
    if failures:
        raise typer.Exit(EXIT_USER_ERROR)


@app.command(cls=Command)
def degrade(
    hr: Annotated[Path, typer.Argument(help="High-resolution (1 mm) input image.", metavar="HR")],
    lr: Annotated[
        Path, typer.Argument(help="Output: degraded image on the same grid.", metavar="LR")
    ],
    keep_lowres: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Also write the true low-resolution volume (coarser voxels) here."
        ),
    ] = None,
    factor: FactorOption = 2,
    axes: AxesOption = "0,2",
    interpolation: InterpolationOption = "linear",
    window: WindowOption = WINDOW_DEFAULT,
    overwrite: Annotated[bool, switch("--overwrite", help="Replace existing outputs.")] = False,
) -> None:
    """Make the paper's low-resolution input from a 1 mm image (k-space crop, two axes)."""
    with user_errors():
        from mrisr_cli.degradation import DegradationConfig
        from mrisr_cli.degrade_file import degrade_file

        axis_tuple, windows = parse_axes(axes), parse_window(window)
        try:
            config = DegradationConfig(
                axes=axis_tuple, factor=factor, interpolation=interpolation, **windows
            )
        except ValueError as exc:
            raise MrisrError(str(exc)) from None
        for message in degrade_file(hr, lr, config, lowres_path=keep_lowres, overwrite=overwrite):
            warn(message)
    stderr_console().print(f"wrote {lr}" + (f" and {keep_lowres}" if keep_lowres else ""))


@app.command(cls=Command)
def demo(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder for hr/lr/sr.nii.gz and demo.png.", metavar="OUTDIR")
    ] = Path("mrisr-demo"),
    alpha: Annotated[float, typer.Option(metavar="A", help="1 = PSNR model, 0 = GAN model.")] = 1.0,
    psnr_weights: Annotated[
        Path | None, typer.Option(metavar="FILE", help="PSNR-stage weights.")
    ] = None,
    gan_weights: Annotated[
        Path | None, typer.Option(metavar="FILE", help="GAN-stage weights.")
    ] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu or cuda.")] = "auto",
    half: Annotated[
        bool,
        switch(
            "--half",
            help="fp16 on CUDA, bf16 on CPU (fp32 without native bf16).",
        ),
    ] = False,
    threads: ThreadsOption = None,
    overwrite: Annotated[bool, switch("--overwrite", help="Replace earlier results.")] = False,
) -> None:
    """Degrade the embedded example T1, super-resolve it, and report PSNR/SSIM and a PNG."""
    with user_errors():
        from rich.table import Table

        from mrisr_cli.demo import run_demo
        from mrisr_cli.errors import WeightsError
        from mrisr_cli.inference import InferenceOptions, resolve_device, resolve_half
        from mrisr_cli.pipeline import load_generator_files
        from mrisr_cli.threads import configure_threads

        configure_threads(threads)
        resolved = resolve_device(device)
        half, half_warning = resolve_half(resolved, half)  # the rule upsample (and the library) use
        if half_warning:
            warn(half_warning)
        try:
            generator = load_generator_files(psnr_weights, gan_weights).generator(alpha, resolved)
        except WeightsError as exc:
            if psnr_weights or gan_weights:
                raise
            warn(f"{exc}; the demo shows the degradation only")
            generator = None
        with _patch_progress("example") as advance:
            report = run_demo(
                out_dir,
                generator,
                options=InferenceOptions(device=resolved, half=half),
                overwrite=overwrite,
                progress=advance,
            )
    table = Table(title=f"mrisr demo: against {report.reference} (inside the head mask)")
    for column in ("volume", "PSNR (dB)", "SSIM", "file"):
        table.add_column(column)
    for key, scores in report.scores.items():
        table.add_row(
            key.upper(), f"{scores['psnr']:.2f}", f"{scores['ssim']:.4f}", str(report.files[key])
        )
    stdout_console().print(table)
    stdout_console().print(f"picture: {report.files['png']}")


@contextmanager
def _patch_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar over patches, as a (done, total) callback."""
    with progress_bar(stderr_console()) as progress:
        task = progress.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield advance


@app.command(cls=Command)
def selftest(
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu or cuda.")] = "cpu",
    threads: ThreadsOption = None,
) -> None:
    """Check the installation end to end with a tiny random network (not a trained model)."""
    with user_errors():
        from mrisr_cli.inference import resolve_device
        from mrisr_cli.selftest import run_selftest
        from mrisr_cli.threads import configure_threads

        configure_threads(threads)
        report = run_selftest(resolve_device(device))
    stdout_console().print(f"selftest passed: {report}", markup=False)


app.command("evaluate", cls=Command)(evaluate_command)

from mrisr_cli.cli_train import prepare_command, train_command  # noqa: E402

app.command("prepare", cls=Command)(prepare_command)
app.command("train", cls=Command)(train_command)


def _command_named(argv: list[str]) -> str:
    """``mrisr upsample`` for ``mrisr upsample a b --alpha``: the command a usage error belongs to,
    where Click's parser raised it before making the command's context (an option missing its
    value); the program alone where no command is named. The program is named as Click names it
    (``python -m mrisr_cli`` when run so)."""
    main_module = sys.modules.get("__main__")
    package = getattr(main_module, "__package__", None)
    program = f"python -m {package}" if package else Path(sys.argv[0]).name or "mrisr"
    names = {
        info.name or info.callback.__name__ for info in app.registered_commands if info.callback
    }
    words = [word for word in argv if not word.startswith("-")]
    return f"{program} {words[0]}" if words and words[0] in names else program


def _usage_error_line(exc: Exception, argv: list[str]) -> str | None:
    """Click's usage errors (bad option values, missing arguments) as one line, or None for other
    exceptions. Duck-typed: Typer vendors its own Click, older Typers use the ``click`` package."""
    if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
        return None
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else _command_named(argv)
    message = " ".join(str(exc.format_message()).split()).rstrip(".")
    if message.endswith("?"):  # "No such command 'upsampel'. Did you mean 'upsample'?"
        return f"{command}: error: {message} (see '{command} --help')"
    return f"{command}: error: {message}; see '{command} --help'"


#: The signal that stopped the command, set by :func:`_stop_on_signal` (None: not stopped).
_stopped_by: signal.Signals | None = None


def _stop_on_signal(signum: int, frame: object) -> None:
    """Ctrl-C, and SIGTERM (SLURM's time limit, ``docker stop``), unwind the command like
    KeyboardInterrupt, so temporary files are removed; in a worker process, the default action."""
    global _stopped_by
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _stopped_by = signal.Signals(signum)
    raise KeyboardInterrupt


_MAIN_PID = os.getpid()


def main() -> None:
    """Console-script entry point: a crash or a usage error becomes one stderr line instead of a
    traceback or Typer's multi-line box; a stop by signal says so in one line."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_on_signal)
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        stderr_console().print("mrisr: aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        usage = _usage_error_line(exc, sys.argv[1:])
        if usage is not None:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `mrisr`: the help, as before
                exc.show()  # type: ignore[attr-defined]
            else:
                stderr_console().print(usage, markup=False, soft_wrap=True)
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        if os.environ.get("MRISR_DEBUG"):
            raise
        stderr_console().print(
            f"mrisr: internal error: {type(exc).__name__}: {exc} "
            "(please report it; MRISR_DEBUG=1 shows the traceback)",
            markup=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_INTERNAL_ERROR)
    if _stopped_by is not None:  # Typer turns the KeyboardInterrupt into exit code 130
        report_line("error", f"stopped by {_stopped_by.name}; unfinished outputs were removed")
        sys.exit(128 + _stopped_by.value)
    sys.exit(code if isinstance(code, int) else 0)
