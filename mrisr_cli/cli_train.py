"""`mrisr prepare` and `mrisr train`: thin Typer commands over :mod:`mrisr_cli.prepare` and
:mod:`mrisr_cli.training`.

Only typer and pathlib are imported here at module level, so that `mrisr --help` stays instant;
numpy, torch and the CLI helpers are imported inside the commands.
"""

from __future__ import annotations

import signal
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from mrisr_cli.cli_options import (
    WINDOW_DEFAULT,
    AxesOption,
    FactorOption,
    InterpolationOption,
    ThreadsOption,
    WindowOption,
    parse_axes,
    parse_triple,
    parse_window,
    switch,
)
from mrisr_cli.console import (
    EXIT_USER_ERROR,
    fail,
    progress_bar,
    stderr_console,
    user_errors,
    warn,
)


class Stage(StrEnum):
    """The two training stages (a choice, so a typo is a usage error)."""

    psnr = "psnr"
    gan = "gan"


GAN_DEFAULTS = {"epochs": 10, "lr": 1e-5}
PSNR_DEFAULTS = {"epochs": 100, "lr": 1e-4}


def _parse_json_object(text: str | None, option: str) -> dict[str, Any] | None:
    import json

    from mrisr_cli.errors import InputError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InputError(f"{option} takes a JSON object like '{{\"features\": 8}}', got {text!r}")
    return value


def prepare_command(
    src_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder of T1 images (searched recursively).", show_default=False, metavar="SRC"
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Output data folder for `mrisr train`.", show_default=False, metavar="OUT"
        ),
    ],
    spacing: Annotated[
        float,
        typer.Option(min=0.1, metavar="MM", help="Isotropic voxel size (mm) of the high-res grid."),
    ] = 1.0,
    n4: Annotated[bool, switch("--n4/--no-n4", help="N4 bias correction (ANTsPy).")] = True,
    split: Annotated[
        str,
        typer.Option(
            metavar="SHARES",
            help="Shares train,val,eval,test, by subject (paper: 780/111/111/111).",
        ),
    ] = "0.7,0.1,0.1,0.1",
    seed: Annotated[int, typer.Option(min=0, metavar="N", help="Seed of the split.")] = 0,
    factor: FactorOption = 2,
    axes: AxesOption = "0,2",
    interpolation: InterpolationOption = "linear",
    window: WindowOption = WINDOW_DEFAULT,
    min_extent: Annotated[
        float,
        typer.Option(
            min=0.0, metavar="MM", help="Smallest field of view (mm) accepted as a brain scan."
        ),
    ] = 64.0,
    jobs: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="Subjects in parallel (default: half the CPUs)."),
    ] = None,
    threads: ThreadsOption = None,
) -> None:
    """Make a training set from a folder of T1 scans (resampled, degraded, normalised, split)."""
    with user_errors():
        from rich.progress import TimeRemainingColumn

        from mrisr_cli.degradation import DegradationConfig
        from mrisr_cli.errors import InputError
        from mrisr_cli.manifest import MANIFEST_NAME
        from mrisr_cli.n4 import n4_in_child_process
        from mrisr_cli.prepare import (
            PrepareOptions,
            SubjectOutcome,
            default_jobs,
            find_scans,
            prepare_dataset,
        )
        from mrisr_cli.splits import parse_ratios
        from mrisr_cli.threads import configure_threads

        try:
            degradation = DegradationConfig(
                axes=parse_axes(axes),
                factor=factor,
                interpolation=interpolation,
                spacing_mm=spacing,
                n4=n4,
                **parse_window(window),
            )
        except ValueError as exc:
            raise InputError(str(exc)) from None
        options = PrepareOptions(
            degradation=degradation,
            ratios=parse_ratios(split),
            seed=seed,
            min_extent_mm=min_extent,
        )
        scans = find_scans(src_dir)
        count = configure_threads(threads)
        console = stderr_console()
        outcomes: list[SubjectOutcome] = []
        with progress_bar(console, TimeRemainingColumn(), transient=False) as progress:
            task = progress.add_task("preparing", total=None)

            def on_start(total: int) -> None:
                progress.update(task, total=total)

            def on_outcome(outcome: SubjectOutcome) -> None:
                outcomes.append(outcome)
                progress.advance(task)
                if outcome.status == "failed":
                    warn(f"skipped {outcome.message}")

            # with --jobs 1, N4 runs in a child process, so that a stop is acted on at once
            with n4_in_child_process():
                manifest = prepare_dataset(
                    src_dir,
                    out_dir,
                    options,
                    jobs=jobs or default_jobs(count),
                    threads=count,
                    on_outcome=on_outcome,
                    on_start=on_start,
                    scans=scans,
                )
    run = manifest.get("run", {})
    for message in run.get("warnings", []):
        warn(message)
    redone = sum(o.status == "done" and o.message.startswith("redone: ") for o in outcomes)
    done = sum(o.status == "done" for o in outcomes) - redone
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    counts = ", ".join(f"{name} {n}" for name, n in manifest["counts"].items())
    splits = (
        f"; {run['kept']} kept their split, {run['assigned']} newly assigned"
        if run.get("kept")
        else ""
    )
    stderr_console().print(
        f"prepared {done + redone + skipped} scans ({done} new, {redone} redone, {skipped} "
        f"already done, {failed} failed): {counts}{splits}; wrote {out_dir / MANIFEST_NAME}",
        markup=False,
    )


def _run_params(out: Path, role: str = "network") -> dict[str, Any] | None:
    """The parameters of the generator (``network``) or the ``critic`` a run in ``out`` was
    started with (for --resume)."""
    import json

    try:
        return dict(json.loads((out / "run.json").read_text())["config"][role]["params"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _file_params(
    path: Path | None, name: str, resume: bool, names: tuple[str, ...] | None = None
) -> dict[str, Any] | None:
    """The parameters in a starting file (--init, --init-critic) when it holds a ``name``
    network ({} otherwise: the checks name the mismatch); None without a file, or on --resume
    once it has moved. ``names``: the run folder's files a checkpoint given instead points to."""
    if path is None or (resume and not path.exists()):
        return None
    from mrisr_cli.training_checks import load_init_weights

    found = load_init_weights(path, names=names)
    return found.network.params if found.network.name == name else {}


def train_command(
    stage: Annotated[
        Stage,
        typer.Option(metavar="STAGE", help="psnr (L1) or gan (WGAN-GP, from --init PSNR weights)."),
    ],
    data: Annotated[Path, typer.Option(metavar="DIR", help="Data folder made by `mrisr prepare`.")],
    out: Annotated[Path, typer.Option(metavar="DIR", help="Run folder: checkpoint, log, weights.")],
    net: Annotated[
        str, typer.Option(metavar="NAME", help="Generator: rrdg, fsrcnn, srresnet or mdcsrn.")
    ] = "rrdg",
    net_params: Annotated[
        str | None,
        typer.Option(
            metavar="JSON",
            help="Generator hyper-parameters, JSON (default: the paper's, or --init's).",
        ),
    ] = None,
    critic_params: Annotated[
        str | None,
        typer.Option(metavar="JSON", help="Patch discriminator hyper-parameters as JSON."),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Starting weights (.safetensors); required by --stage gan."
        ),
    ] = None,
    init_critic: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="gan: the critic to start from, a GAN run's critic.safetensors (continues that "
            "stage with its --init RUN/last.safetensors; default: a new critic).",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Epochs (default: 100 psnr, 10 gan).")
    ] = None,
    steps_per_epoch: Annotated[
        int, typer.Option(min=1, metavar="N", help="Steps per epoch (validation after each).")
    ] = 1000,
    batch_size: Annotated[
        int, typer.Option(min=1, metavar="N", help="Patches per step and process.")
    ] = 4,
    lr: Annotated[
        float | None,
        typer.Option(
            metavar="RATE", help="Generator learning rate (default: 1e-4 psnr, 1e-5 gan)."
        ),
    ] = None,
    critic_lr: Annotated[
        float | None,
        typer.Option(metavar="RATE", help="Critic learning rate (default: 5 x --lr)."),
    ] = None,
    lambda_adv: Annotated[
        float,
        typer.Option(
            metavar="WEIGHT", help="lambda_D: weight of the critic's score in the generator loss."
        ),
    ] = 0.1,
    lambda_gp: Annotated[
        float, typer.Option(metavar="WEIGHT", help="lambda_g: gradient-penalty weight.")
    ] = 10.0,
    critic_steps: Annotated[
        int, typer.Option(min=1, metavar="N", help="Critic steps per generator step.")
    ] = 5,
    critic_warmup: Annotated[
        int, typer.Option(min=0, metavar="N", help="First steps that train the critic only.")
    ] = 100,
    patch: Annotated[
        str, typer.Option(metavar="X,Y,Z", help="Training patch (canonical axes).")
    ] = "64,40,64",
    val_patch: Annotated[
        str,
        typer.Option(
            metavar="X,Y,Z", help="Validation tile, as `upsample --patch` (whole volumes)."
        ),
    ] = "64,40,64",
    amp: Annotated[
        bool | None,
        switch(
            "--amp/--no-amp",
            help="Mixed precision (default: on for CUDA, off on CPU).",
        ),
    ] = None,
    checkpointing: Annotated[
        bool,
        switch(
            "--checkpointing/--no-checkpointing",
            help="Gradient checkpointing of RRDG's dense blocks (less memory, slower).",
        ),
    ] = True,
    compile_model: Annotated[
        bool, switch("--compile", help="torch.compile the generator.")
    ] = False,
    resume: Annotated[
        bool,
        switch("--resume", help="Continue the run in --out from its checkpoint."),
    ] = False,
    seed: Annotated[
        int, typer.Option(min=0, metavar="N", help="Seed of initialisation and patch sampling.")
    ] = 0,
    device: Annotated[
        str, typer.Option(metavar="DEVICE", help="auto, cpu or cuda (cuda:N).")
    ] = "auto",
    workers: Annotated[
        int, typer.Option(min=1, metavar="N", help="Threads reading patches ahead.")
    ] = 2,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            min=0, metavar="N", help="Also checkpoint every N steps (0: each epoch only)."
        ),
    ] = 0,
    log_every: Annotated[
        int, typer.Option(min=1, metavar="N", help="Steps per log.jsonl record.")
    ] = 10,
    time_limit: Annotated[
        float,
        typer.Option(
            min=0.0,
            metavar="MIN",
            help="Minutes of training in this call (0: none); then validate, write weights "
            "and a checkpoint that --resume continues.",
        ),
    ] = 0.0,
    precise_bn: Annotated[
        int,
        typer.Option(
            min=0,
            metavar="N",
            help="Training patches over which BatchNorm statistics are recomputed before each "
            "validation and export (0: keep the running averages).",
        ),
    ] = 32,
    deterministic: Annotated[
        bool,
        switch("--deterministic", help="Deterministic cuDNN kernels (slower)."),
    ] = False,
    threads: ThreadsOption = None,
) -> None:
    """Train a generator: --stage psnr, then --stage gan --init PSNR_RUN/best.safetensors
    (several GPUs: torchrun --nproc_per_node=N -m mrisr_cli train ...)."""
    import os

    is_main = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    with user_errors():
        from mrisr_cli.distributed import worker_threads
        from mrisr_cli.networks import NetworkConfig
        from mrisr_cli.run_files import CRITIC_NAME
        from mrisr_cli.threads import configure_threads
        from mrisr_cli.training import StoppedAtOnce, train
        from mrisr_cli.training import resume as resume_run
        from mrisr_cli.training_config import CRITIC_LR_PER_LR, TrainConfig

        patch_size = parse_triple(patch, "--patch")
        val_size = parse_triple(val_patch, "--val-patch")
        defaults = GAN_DEFAULTS if stage is Stage.gan else PSNR_DEFAULTS
        params = _parse_json_object(net_params, "--net-params")
        if params is None and resume:  # the run's own; its --init file may have moved since
            params = _run_params(out)
        if params is None:
            params = _file_params(init, net, resume)
        critic = _parse_json_object(critic_params, "--critic-params")
        if critic is None and resume:  # the run's own, as the generator's
            critic = _run_params(out, "critic")
        if critic is None:
            critic = _file_params(init_critic, "patch_discriminator", resume, (CRITIC_NAME,))
        rate = lr if lr is not None else float(defaults["lr"])
        config = TrainConfig(
            stage=stage.value,
            data=str(data),
            out=str(out),
            network=NetworkConfig(net, params or {}),
            critic=NetworkConfig("patch_discriminator", critic or {}),
            init=str(init) if init is not None else None,
            critic_init=str(init_critic) if init_critic is not None else None,
            epochs=epochs or int(defaults["epochs"]),
            steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            lr=rate,
            critic_lr=critic_lr if critic_lr is not None else CRITIC_LR_PER_LR * rate,
            lambda_adv=lambda_adv,
            lambda_gp=lambda_gp,
            critic_steps=critic_steps,
            critic_warmup=critic_warmup,
            patch=patch_size,
            val_patch=val_size,
            amp=amp,
            checkpointing=checkpointing,
            compile=compile_model,
            deterministic=deterministic,
            seed=seed,
            device=device,
            workers=workers,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            time_limit=time_limit * 60.0,
            precise_bn=precise_bn,
        )
        configure_threads(worker_threads(threads))
        progress, on_event = _train_display(config, stderr_console(), warn, enabled=is_main)
        stopped: StoppedAtOnce | None = None
        started = time.perf_counter()
        try:
            with progress:
                result = (resume_run if resume else train)(config, on_event=on_event)
        except StoppedAtOnce as exc:
            stopped = exc
    if stopped is not None:
        if is_main:
            _report_stopped_at_once(stopped)
        raise typer.Exit(130)
    if not is_main:
        return
    console = stderr_console()
    if result.status == "interrupted":
        console.print(
            f"interrupted at step {result.step} of {result.total_steps}; checkpoint written to "
            f"{out / 'checkpoint.pt'}; continue with the same command and --resume",
            markup=False,
        )
        raise typer.Exit(128 + (result.signal or signal.SIGINT))  # 130 Ctrl-C, 143 SIGTERM
    best = f"{result.best_psnr:.2f} dB" if result.best_psnr is not None else "n/a"
    best_step = _step_of(out / "best.safetensors") if result.best_psnr is not None else None
    if best_step is not None:
        best += f" (step {best_step})"
    if result.best_psnr is not None and result.input_validation:
        best += f", input {result.input_validation['psnr']:.2f} dB"
    ended = "done" if result.status == "done" else "time limit reached"
    more = "; continue with the same command and --resume" if result.status != "done" else ""
    console.print(
        f"{ended}: {result.step} of {result.total_steps} steps in "
        f"{_duration(time.perf_counter() - started)}{more}; best validation PSNR "
        f"{best}; weights: {result.best_weights or '-'} (best), "
        f"{result.last_weights or '-'} (last)",
        markup=False,
    )
    if result.last_weights is None:
        raise fail("no weights were written", EXIT_USER_ERROR)


def _step_of(weights: Path) -> int | None:
    """The training step a weights file records (None: no file, or none recorded): the best
    model may come from an earlier call of a resumed run."""
    from safetensors import SafetensorError

    from mrisr_cli.weights import provenance_of, read_metadata

    try:
        provenance = provenance_of(read_metadata(weights))
    except (SafetensorError, OSError):
        return None
    step = provenance.get("step") if isinstance(provenance, dict) else None
    return step if isinstance(step, int) else None


def _duration(seconds: float) -> str:
    """This call's wall time: ``42 s``, ``7 min 03 s`` or ``2 h 05 min``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _report_stopped_at_once(stopped: Any) -> None:
    """A second Ctrl-C ends training without the usual summary: say whether --resume has a
    checkpoint to start from (the one written before, not one of this moment)."""
    where = f"stopped at once at step {stopped.step} of {stopped.total_steps} (second Ctrl-C)"
    if stopped.saved_step is None:
        saved = "no checkpoint was written, so there is nothing to resume"
    else:
        saved = (
            f"{stopped.checkpoint} holds step {stopped.saved_step}; continue from it with the "
            "same command and --resume"
        )
    stderr_console().print(f"{where}; {saved}", markup=False)


def _train_display(config: Any, console: Any, warn: Any, *, enabled: bool) -> tuple[Any, Any]:
    """A rich progress bar and the event callback that feeds it (rank 0 only)."""
    import contextlib

    from rich.progress import Progress, TextColumn, TimeRemainingColumn

    class _LazyProgress(Progress):
        """Shown from the first training event on, so that errors in the settings (found
        before training starts) are the only output."""

        def __enter__(self) -> _LazyProgress:
            return self

        def __exit__(self, *exc: object) -> None:
            self.stop()

    if not enabled:
        return contextlib.nullcontext(), None
    progress = progress_bar(
        console,
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        transient=False,
        kind=_LazyProgress,
    )
    task = progress.add_task(f"{config.stage} {config.network.name}", total=None, status="")

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        if kind == "start":
            progress.start()
            progress.update(task, total=payload["total_steps"], completed=payload["step"])
            verb = "resuming" if payload["resumed"] else "training"
            progress.console.print(
                f"{verb} on {payload['device']} x {payload['world']} process(es) from step "
                f"{payload['step']} of {payload['total_steps']}",
                markup=False,
            )
        elif kind == "step":
            losses = payload["losses"]
            text = " ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items()))
            progress.update(task, completed=payload["step"], status=text)
        elif kind == "validating":  # whole volumes take a while: say why the bar stands still
            progress.update(task, status=f"validating ({payload['subjects']} volumes)")
        elif kind == "epoch":
            metrics, inputs = payload["metrics"], payload.get("input_metrics") or {}
            # the input's own score tells whether the model beats what it was given
            versus = (
                f" (input {inputs['psnr']:.2f} dB, {metrics['psnr'] - inputs['psnr']:+.2f})"
                if metrics and inputs
                else ""
            )
            scores = (
                f"val PSNR {metrics['psnr']:.2f} dB{versus} SSIM {metrics['ssim']:.4f}"
                if metrics
                else "no validation"
            )
            progress.console.print(
                f"epoch {payload['epoch']}: {scores}{' (best)' if payload['best'] else ''}; "
                f"{payload['patches_per_second']:.2f} patches/s, data wait "
                f"{100 * payload['data_wait_fraction']:.1f}%",
                markup=False,
            )
        elif kind == "warning":
            warn(payload["message"])

    return progress, on_event
