"""Training the generators: the PSNR stage (L1, Adam) and the GAN stage (WGAN-GP, patch critic).

This module holds the networks and optimisers with one step of each kind (:class:`Trainer`)
and the loop of a run. The settings are in :mod:`mrisr_cli.training_config`, the checks that make
a start or ``--resume`` safe in :mod:`mrisr_cli.training_checks`, the losses in
:mod:`mrisr_cli.losses`, the run folder's files (checkpoint, log, names) in
:mod:`mrisr_cli.run_files`, the helpers for several processes in :mod:`mrisr_cli.distributed`.

Why it is built this way:

- **Reproducible and resumable.** Batches are a pure function of the step (see
  :mod:`mrisr_cli.patches`), the gradient-penalty interpolation weights likewise, and a checkpoint
  holds the model, optimiser, AMP scaler, RNG states and step. So ``--resume`` after an
  interruption continues bit for bit the run that would have happened without it (on the CPU,
  where the kernels are deterministic; on a GPU up to cuDNN's algorithm choice).
- **Safe to interrupt.** Ctrl-C or SIGTERM (SLURM's warning at the time limit) sets a flag; the
  step in progress (or the validation) finishes, a checkpoint is written and training returns.
  Checkpoints and weights are written to a temporary file and renamed, so a full disk leaves the
  previous ones.
- **Several GPUs.** Under ``torchrun`` each process is one DistributedDataParallel rank and takes
  its slice of the global batch, so N processes compute what one process would with an N times
  larger batch (BatchNorm becomes SyncBatchNorm on CUDA for the same reason). Only rank 0 writes.
- **Validated as it is used.** Validation super-resolves whole validation volumes through
  :func:`mrisr_cli.inference.super_resolve`, the stitching code of `mrisr upsample`, and scores
  them with :mod:`mrisr_cli.metrics`, as `mrisr evaluate` does. Before that, BatchNorm
  statistics are recomputed with the current weights over ``precise_bn`` fixed training patches
  (:mod:`mrisr_cli.batchnorm`): the running averages lag fast-moving weights, and eval mode, which
  validation and `upsample` use, would inherit that lag.
- **Directly usable weights.** ``best.safetensors`` and ``last.safetensors`` are written with
  :func:`mrisr_cli.weights.save_weights`, with the dataset's degradation settings and the
  training provenance in their metadata: `mrisr upsample --psnr-weights RUN/best.safetensors`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from mrisr_cli import __version__
from mrisr_cli.batchnorm import batchnorm_layers, recalibrate_batchnorm, sampler_batches
from mrisr_cli.distributed import (
    DistInfo,
    all_gather,
    barrier,
    errors_shared,
    init_distributed,
)
from mrisr_cli.errors import DeviceError, InputError, MrisrError, OutputError
from mrisr_cli.inference import InferenceOptions, super_resolve
from mrisr_cli.losses import critic_loss, interpolation_weights, l1_loss
from mrisr_cli.manifest import Manifest
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.patches import PatchOptions, PatchSampler, Prefetcher, open_split
from mrisr_cli.run_files import (
    BEST_NAME,
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    CRITIC_NAME,
    LAST_NAME,
    LOG_NAME,
    RUN_NAME,
    JsonlLog,
    append_resume,
    git_commit,
    rng_state,
    set_rng_state,
    tensor_bytes,
    write_checkpoint,
    write_failure,
)
from mrisr_cli.training_checks import RunInputs, read_inputs
from mrisr_cli.training_config import TrainConfig
from mrisr_cli.volumes import atomic_path
from mrisr_cli.weights import WeightsFile, save_weights

EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    """How a call to :func:`train` ended and where its files are."""

    status: str  # "done", "interrupted" (signal) or "time-limit"
    step: int
    total_steps: int
    out: Path
    best_psnr: float | None = None
    last_weights: Path | None = None
    best_weights: Path | None = None
    validation: dict[str, float] = field(default_factory=dict)  # this call's last validation
    # the same scores for the validation inputs themselves ({}: no validation in this call)
    input_validation: dict[str, float] = field(default_factory=dict)
    signal: int | None = None  # the signal that interrupted this process (SIGINT, SIGTERM)


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C stopped training mid-step or mid-validation. Still a KeyboardInterrupt,
    but it says what is on disk, so the CLI can tell the user whether --resume has a start."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path, saved_step: int | None):
        super().__init__(step)
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint
        self.saved_step = saved_step  # the step checkpoint.pt holds; None: there is none


# --- the trainer ------------------------------------------------------------------------------


def training_amp_dtype(device: str) -> torch.dtype:
    """bf16 where the GPU has it (Ampere and later): fp32's range, so no loss scaling, and the
    WGAN-GP input gradient cannot overflow (under fp16 it did: NaN at the first critic step on an
    H200); fp16 with loss scaling on older GPUs; bf16 on the CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _lr_factor(config: TrainConfig, step: int) -> float:
    """Step decay as the authors' code: x lr_decay every lr_decay_steps (a function of the step
    only, so resuming needs no scheduler state)."""
    return config.lr_decay ** (step // config.lr_decay_steps)


class Trainer:
    """Networks, optimisers and AMP scalers of one run, and one training step of each kind.

    Used by :func:`train` and by ``benchmarks/bench_train.py``, so the benchmark times the same
    code. ``generator``/``critic`` are the plain modules (their state is what is saved);
    ``g_train``/``d_train`` are what the steps call (DDP-wrapped and/or compiled).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        device: str = "cpu",
        dist: DistInfo | None = None,
        init: WeightsFile | None = None,
        critic_init: WeightsFile | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.dist = dist or DistInfo()
        cuda = device.startswith("cuda")
        self.use_amp = bool(config.amp if config.amp is not None else cuda)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.generator = build_network(config.network)
        if init is not None:
            self.generator.load_state_dict(init.state, strict=True)
        if hasattr(self.generator, "set_checkpointing"):
            self.generator.set_checkpointing(config.checkpointing)
        self.critic: nn.Module | None = None
        if config.stage == "gan":
            self.critic = build_network(config.critic)
            if critic_init is not None:
                self.critic.load_state_dict(critic_init.state, strict=True)
        if self.dist.enabled and cuda:
            self.generator = nn.SyncBatchNorm.convert_sync_batchnorm(self.generator)
        self.generator.to(device).train()
        betas = tuple(config.betas)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.amp_dtype = training_amp_dtype(device)
        scaled = self.use_amp and cuda and self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler("cuda", enabled=scaled)
        self.opt_d: torch.optim.Optimizer | None = None
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=scaled)
        if self.critic is not None:
            self.critic.to(device).train()
            self.opt_d = torch.optim.Adam(
                self.critic.parameters(), lr=config.critic_lr, betas=betas
            )
        self.g_train: nn.Module = self.generator
        self.d_train: nn.Module | None = self.critic

    def wrap(self) -> None:
        """DDP-wrap (several processes) and compile (``--compile``); after loading states."""
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
            self.g_train = DDP(self.generator, device_ids=ids)
            if self.critic is not None:
                self.d_train = DDP(self.critic, device_ids=ids)
        if self.config.compile:
            self.g_train = torch.compile(self.g_train)  # type: ignore[assignment]

    def set_step_lr(self, step: int) -> None:
        factor = _lr_factor(self.config, step)
        for group in self.opt_g.param_groups:
            group["lr"] = self.config.lr * factor
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = self.config.critic_lr * factor

    def _autocast(self) -> Any:
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp_dtype)

    def psnr_step(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Adam step on the L1 loss."""
        with self._autocast():
            sr = self.g_train(lr)
        loss = l1_loss(sr, hr)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        return {"l1": loss.detach()}

    def critic_step(
        self, lr: torch.Tensor, hr: torch.Tensor, gamma: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One critic step on L_D, with the generator's output held fixed."""
        assert self.critic is not None and self.d_train is not None and self.opt_d is not None
        with torch.no_grad(), self._autocast():
            sr = self.g_train(lr)
        with self._autocast():
            loss, distance, penalty = critic_loss(
                self.d_train,
                hr,
                sr.float(),
                gamma.to(self.device),
                self.config.lambda_gp,
                scale=float(self.scaler_d.get_scale()) if self.scaler_d.is_enabled() else 1.0,
            )
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(loss).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        return {"d_loss": loss.detach(), "w_distance": distance, "gp": penalty}

    def generator_step(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """One generator step on L_G = L1 + lambda_adv * D(sr), the critic frozen."""
        assert self.critic is not None
        _set_requires_grad(self.critic, False)
        try:
            with self._autocast():
                sr = self.g_train(lr)
                adversarial = self.critic(sr).float().mean()
            l1 = l1_loss(sr, hr)
            loss = l1 + self.config.lambda_adv * adversarial
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler_g.scale(loss).backward()
            self.scaler_g.step(self.opt_g)
            self.scaler_g.update()
        finally:
            _set_requires_grad(self.critic, True)
        return {"l1": l1.detach(), "g_adv": adversarial.detach(), "g_loss": loss.detach()}

    def fetches_per_step(self, step: int) -> int:
        """Batches one step consumes: 1 (psnr); critic steps, plus one after the warm-up (gan)."""
        if self.config.stage == "psnr":
            return 1
        return self.config.critic_steps + (1 if step >= self.config.critic_warmup else 0)

    def step(self, step: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """One training step (for gan: critic steps, then a generator step after the warm-up)."""
        self.set_step_lr(step)
        if self.config.stage == "psnr":
            return self.psnr_step(*next(batches))
        cfg = self.config
        sums: dict[str, torch.Tensor] = {}
        batch = cfg.batch_size
        for k in range(cfg.critic_steps):
            lr, hr = next(batches)
            gamma = interpolation_weights(
                cfg.seed, (step, k), batch * self.dist.world, batch * self.dist.rank, batch
            )
            for name, value in self.critic_step(lr, hr, gamma).items():
                sums[name] = sums.get(name, 0.0) + value / cfg.critic_steps
        if step >= cfg.critic_warmup:
            sums.update(self.generator_step(*next(batches)))
        return sums

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "generator": self.generator.state_dict(),
            "optimizer_g": self.opt_g.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
        }
        if self.critic is not None and self.opt_d is not None:
            state["critic"] = self.critic.state_dict()
            state["optimizer_d"] = self.opt_d.state_dict()
            state["scaler_d"] = self.scaler_d.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["optimizer_g"])
        if state.get("scaler_g"):
            self.scaler_g.load_state_dict(state["scaler_g"])
        if self.critic is not None and self.opt_d is not None:
            self.critic.load_state_dict(state["critic"])
            self.opt_d.load_state_dict(state["optimizer_d"])
            if state.get("scaler_d"):
                self.scaler_d.load_state_dict(state["scaler_d"])


# --- stop requests ----------------------------------------------------------------------------


class StopRequest:
    """Ctrl-C / SIGTERM set a flag that the loop reads after each step and after validation; a
    second Ctrl-C stops at once (KeyboardInterrupt). Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None  # the first signal received: the CLI exits 128 + it
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = True
        if self.signal is None:
            self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --- validation -------------------------------------------------------------------------------


def validate(
    model: nn.Module,
    subjects: list[Any],
    options: InferenceOptions,
    dist: DistInfo,
) -> dict[str, float]:
    """Mean PSNR/SSIM/NRMSE (whole volume and inside the mask) and HF power/corr (the texture
    a GAN stage should add) over the validation volumes, each super-resolved whole by the
    stitching code of `upsample`; ranks share the subjects."""
    scores = _mean_scores(subjects, lambda lr: super_resolve(lr, model, options), options, dist)
    model.train()
    return scores


def input_scores(
    subjects: list[Any], options: InferenceOptions, dist: DistInfo
) -> dict[str, float]:
    """The scores of :func:`validate` with the low-resolution input itself as the prediction:
    the level a model must beat to be of any use, so that a validation PSNR can be read."""
    return _mean_scores(subjects, lambda lr: lr, options, dist)


#: How far below the input's PSNR a validation must be, at least, to be warned about.
FAR_BELOW_INPUT_DB = 10.0


def far_below_input(psnr: float, input_psnr: float) -> bool:
    """Whether a validation PSNR says that training has gone wrong, not merely that it has not
    got far yet: more than 10 dB below the input's, and below 0 dB.

    Below the input alone says little: an untrained network outputs a near-constant volume, at
    9 to 14 dB on four whole real volumes whose inputs score 28 to 42 dB (15 to 28 dB below),
    12 dB on the test crops (input 23 dB), the paper-size RRDG and a tiny one alike. Below 0 dB
    the RMS error exceeds the whole intensity range of the HR volume (the metrics scale it to
    [0, 1]), which an output inside the data's range cannot reach; on the test crops a tiny RRDG
    trained with ``--lr 10`` scored -114 to -149 dB, ``--lr 1`` -61 to -89 and ``--lr 0.1`` -1
    to -25 in its first validations. NaN (a NaN output) counts as below.
    """
    return not psnr >= min(input_psnr - FAR_BELOW_INPUT_DB, 0.0)


def _mean_scores(
    subjects: list[Any],
    predict: Callable[[np.ndarray], np.ndarray],
    options: InferenceOptions,
    dist: DistInfo,
) -> dict[str, float]:
    """``predict(lr)`` scored against each subject's HR volume, this rank's share of the
    subjects; the mean over all subjects, on every rank."""
    from mrisr_cli.metrics import image_metrics

    rows = []
    for subject in subjects[dist.rank :: dist.world]:
        lr = np.asarray(subject.lr, dtype=np.float32)
        hr = np.asarray(subject.hr, dtype=np.float32)
        mask = np.asarray(subject.mask, dtype=bool)
        rows.append(image_metrics(hr, predict(lr), mask, device=options.device).as_dict())
    gathered = [row for part in all_gather(dist, rows) for row in part]
    if not gathered:
        return {}
    return {k: float(np.mean([row[k] for row in gathered])) for k in gathered[0]}


# --- the training run -------------------------------------------------------------------------


def train(
    config: TrainConfig,
    *,
    on_event: EventCallback | None = None,
) -> TrainResult:
    """Start a training run in ``config.out`` (see the module docstring)."""
    return _train(config, resume=False, on_event=on_event)


def resume(config: TrainConfig, *, on_event: EventCallback | None = None) -> TrainResult:
    """Continue the run in ``config.out`` from its checkpoint; settings must match."""
    return _train(config, resume=True, on_event=on_event)


def _train(config: TrainConfig, *, resume: bool, on_event: EventCallback | None) -> TrainResult:
    """Join the process group (several processes) around the run; name GPU memory errors."""
    dist, device, started_group = init_distributed(config.device)
    try:
        return _run(config, dist, device, resume=resume, on_event=on_event)
    except torch.OutOfMemoryError as exc:
        raise DeviceError(
            f"out of GPU memory at --batch-size {config.batch_size} with --patch "
            f"{','.join(map(str, config.patch))}; use a smaller batch or keep --checkpointing on"
        ) from exc
    finally:
        if started_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run(
    config: TrainConfig,
    dist: DistInfo,
    device: str,
    *,
    resume: bool,
    on_event: EventCallback | None,
) -> TrainResult:
    """Set the run up, train until the end, a stop request or the time limit, and finish."""
    run = _TrainingRun(config, dist, device, resume=resume, on_event=on_event)
    fetch = _fetcher(run.sampler, run.config, dist, device)
    try:
        with (
            StopRequest() as stop,
            Prefetcher(
                fetch, run.batch_keys(), depth=run.config.prefetch, workers=run.config.workers
            ) as prefetch,
        ):
            run.train_steps(stop, prefetch)
        if run.result.status == "interrupted":
            run.result.signal = stop.signal  # None on a rank that stopped because another did
    except KeyboardInterrupt as exc:  # a second Ctrl-C (StopRequest): say what is on disk
        raise StoppedAtOnce(run.step, run.total, run.checkpoint_path, run.saved_at) from exc
    return run.finish()


@dataclass
class _Throughput:
    """Training time, time spent waiting for batches, and patches since the last validation."""

    seconds: float = 0.0
    waited: float = 0.0
    patches: int = 0

    @property
    def data_wait_fraction(self) -> float:
        return self.waited / max(self.seconds, 1e-9)

    @property
    def patches_per_second(self) -> float:
        return self.patches / max(self.seconds, 1e-9)


class _TrainingRun:
    """One call of :func:`train` or :func:`resume`: its checked inputs, trainer, data, files and
    progress, shared by the steps of :meth:`train_steps` (rank 0 alone writes and emits)."""

    def __init__(
        self,
        config: TrainConfig,
        dist: DistInfo,
        device: str,
        *,
        resume: bool,
        on_event: EventCallback | None,
    ) -> None:
        self.dist, self.device, self._on_event = dist, device, on_event
        self.config = config = _resolved_config(config, device)
        self.out = Path(config.out)
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        inputs = read_inputs(
            config, dist, resume=resume, warn=lambda m: self.emit("warning", message=m)
        )
        manifest, payload, init = inputs.manifest, inputs.payload, inputs.init
        self.manifest = manifest
        self.init_sha = init.sha256 if init else str(payload.get("init_sha256", ""))
        self.trainer = Trainer(
            config, device=device, dist=dist, init=init, critic_init=inputs.critic_init
        )
        # (step, best PSNR, log records kept): a fresh run starts at 0 with a fresh log
        self.step, self.best, log_keep = (
            _restore(self.trainer, payload, dist) if resume else (0, None, 0)
        )
        # loss sums (and their steps) since the last "train" log record; the checkpoint carries
        # them, so a resumed run's records average the same steps as an uninterrupted run's
        self.window, self.window_steps = (
            _log_window(payload, self.checkpoint_path) if resume else ({}, 0)
        )
        self.trainer.wrap()
        self.train_subjects = open_split(manifest, "train")
        self.val_subjects = open_split(manifest, "val")
        self.sampler = PatchSampler(
            self.train_subjects,
            PatchOptions(config.patch, config.foreground_fraction, tuple(config.flip_axes)),
            seed=config.seed,
        )
        self.log = _open_run_folder(
            config,
            manifest,
            dist,
            resume=resume,
            log_keep=log_keep,
            step=self.step,
            device=device,
            warn=lambda m: self.emit("warning", message=m),
        )
        self.provenance = _provenance_base(config, manifest, dist, inputs)
        self.val_options = InferenceOptions(
            patch=tuple(config.val_patch),  # type: ignore[arg-type]
            batch_size=config.val_batch_size,
            device=device,
            half=config.amp,
        )
        self.total = config.total_steps
        self._announce(resume)
        self.result = TrainResult("done", self.step, self.total, self.out, best_psnr=self.best)
        if not self.val_subjects:
            self.emit(
                "warning", message="no validation subjects in the data folder: no best weights"
            )
        self.saved_at: int | None = self.step if resume else None  # what checkpoint.pt holds
        self.throughput = _Throughput()
        # the validation inputs' own scores, computed at this call's first validation (they
        # do not change), and whether this call has warned that the model is far below them
        self.input_metrics: dict[str, float] | None = None
        self.warned_far_below = False

    def emit(self, kind: str, **payload: Any) -> None:
        """Tell the caller's ``on_event`` (rank 0 only)."""
        if self._on_event is not None and self.dist.is_main:
            self._on_event(kind, payload)

    def _announce(self, resume: bool) -> None:
        """The log's first record of this call, and the "start" event."""
        if self.log is not None:
            self.log.write(
                "resume" if resume else "start",
                step=self.step,
                total_steps=self.total,
                world_size=self.dist.world,
                device=self.device,
                train_subjects=len(self.train_subjects),
                val_subjects=len(self.val_subjects),
            )
        self.emit(
            "start",
            step=self.step,
            total_steps=self.total,
            resumed=resume,
            device=self.device,
            world=self.dist.world,
        )

    def batch_keys(self) -> Iterator[tuple[int, ...]]:
        """The key of every batch from this step to the last, in the order steps consume them."""
        start = self.step
        fetches = self.trainer.fetches_per_step
        return ((s, k) for s in range(start, self.total) for k in range(fetches(s)))

    # -- the loop --------------------------------------------------------------------------

    def train_steps(self, stop: StopRequest, prefetch: Prefetcher) -> None:
        """Steps until the last one, or until a stop request or the time limit ends the call."""
        config = self.config
        batches = (
            (lr.to(self.device, non_blocking=True), hr.to(self.device, non_blocking=True))
            for lr, hr in prefetch
        )
        loop_started = time.perf_counter()
        while self.step < self.total:
            stopping, timed_out = self._train_step(batches, prefetch, stop, loop_started)
            step = self.step
            # a time limit ends the call like an epoch: validated, exported weights
            if step % config.steps_per_epoch == 0 or (timed_out and step < self.total):
                self._end_epoch()
            elif config.checkpoint_every and step % config.checkpoint_every == 0:
                self.save_checkpoint(step)
            # a stop asked for after the losses were agreed (in the step's event or log line,
            # in validation or a checkpoint) ends the call here, not a step later
            stopping = stopping or _stop_agreed(stop, self.dist, self.device)
            if stopping and step < self.total:
                self._stop_early(timed_out)
                return

    def _train_step(
        self,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        prefetch: Prefetcher,
        stop: StopRequest,
        loop_started: float,
    ) -> tuple[bool, bool]:
        """One step, its losses agreed by the ranks and recorded; returns (stopping, timed_out):
        whether the call ends after this step, and whether the time limit is why."""
        config = self.config
        started, waited = time.perf_counter(), prefetch.wait_seconds
        patches = self.trainer.fetches_per_step(self.step) * config.batch_size * self.dist.world
        losses = self.trainer.step(self.step, batches)
        time_up = bool(config.time_limit) and (
            time.perf_counter() - loop_started >= config.time_limit
        )
        values = _reduce_losses(losses, stop.requested, time_up, self.dist, self.device)
        requested, time_up = bool(values.pop("_stop")), bool(values.pop("_time_up"))
        stopping = requested or time_up
        timed_out = time_up and not requested
        self.step += 1
        elapsed = time.perf_counter() - started
        self.throughput.seconds += elapsed
        self.throughput.waited += prefetch.wait_seconds - waited
        self.throughput.patches += patches
        self._record_losses(values)
        return stopping, timed_out

    def _record_losses(self, values: dict[str, float]) -> None:
        """Refuse non-finite losses; emit the step; log the window's means every log_every."""
        config, step = self.config, self.step
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise MrisrError(
                f"training diverged at step {step} ({bad[0]} is {values[bad[0]]}); start a new "
                "run with a lower --lr (--init RUN/last.safetensors keeps what was learnt; "
                "--resume would repeat the same steps)"
            )
        for k, v in values.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window_steps += 1
        lr = config.lr * _lr_factor(config, step - 1)
        self.emit("step", step=step, losses=values, lr=lr)
        if step % config.log_every == 0 or step == self.total:
            if self.log is not None:
                self.log.write(
                    "train",
                    step=step,
                    epoch=(step - 1) // config.steps_per_epoch + 1,
                    lr=lr,
                    **{k: v / self.window_steps for k, v in self.window.items()},
                )
            # on every rank, so that each holds the window rank 0 saves in the checkpoint
            self.window, self.window_steps = {}, 0

    def _end_epoch(self) -> None:
        """Validate, export last (and best) weights, log the epoch, write a checkpoint."""
        config, step = self.config, self.step
        epoch = math.ceil(step / config.steps_per_epoch)
        self.emit("validating", step=step, epoch=epoch, subjects=len(self.val_subjects))
        metrics = self._validate()
        self.result.validation = metrics
        inputs = self._input_metrics()
        data_wait = self.throughput.data_wait_fraction
        rate = self.throughput.patches_per_second
        improved = bool(metrics) and (self.best is None or metrics["psnr"] > self.best)
        if improved:
            self.best = metrics["psnr"]
        with errors_shared(self.dist):  # a failed export stops every rank, not rank 0 alone
            if self.dist.is_main:
                self.result.last_weights = self.export(LAST_NAME, step, metrics)
                if self.trainer.critic is not None:
                    self.export_critic(step)
                if improved:
                    self.result.best_weights = self.export(BEST_NAME, step, metrics)
        if self.dist.is_main and self.log is not None:
            self.log.write(
                "epoch",
                step=step,
                epoch=epoch,
                data_wait_fraction=data_wait,
                patches_per_second=rate,
                best=improved,
                **{f"val_{k}": v for k, v in metrics.items()},
                **{f"input_{k}": v for k, v in inputs.items()},
            )
        self.emit(
            "epoch",
            step=step,
            epoch=epoch,
            metrics=metrics,
            input_metrics=inputs,
            best=improved,
            data_wait_fraction=data_wait,
            patches_per_second=rate,
        )
        self._warn_if_far_below_input(step, metrics, inputs)
        self.throughput = _Throughput()
        self.save_checkpoint(step)

    def _validate(self) -> dict[str, float]:
        """Validation scores, after BatchNorm statistics are recomputed (``precise_bn``)."""
        config, generator = self.config, self.trainer.generator
        if config.precise_bn and batchnorm_layers(generator):
            recalibrate_batchnorm(
                generator,
                sampler_batches(self.sampler, config.precise_bn, config.batch_size, self.device),
            )
        return validate(generator, self.val_subjects, self.val_options, self.dist)

    def _input_metrics(self) -> dict[str, float]:
        """The validation inputs' own scores, computed once per call (on every rank)."""
        if self.input_metrics is None:
            self.input_metrics = input_scores(self.val_subjects, self.val_options, self.dist)
            self.result.input_validation = self.input_metrics
        return self.input_metrics

    def _warn_if_far_below_input(
        self, step: int, metrics: dict[str, float], inputs: dict[str, float]
    ) -> None:
        """Warn once per call when a validation says training has gone wrong (see
        :func:`far_below_input`): a diverged run otherwise trains on without a word."""
        if self.warned_far_below or not metrics or not inputs:
            return
        if far_below_input(metrics["psnr"], inputs["psnr"]):
            self.warned_far_below = True
            self.emit(
                "warning",
                message=f"validation PSNR {metrics['psnr']:.2f} dB at step {step} is far below "
                f"the input's {inputs['psnr']:.2f} dB: training has gone wrong; lower --lr "
                f"(now {self.config.lr:g}) or check the data",
            )

    def _stop_early(self, timed_out: bool) -> None:
        """End the call before the last step: a checkpoint to resume from, and why in the log."""
        step = self.step
        if self.saved_at != step:  # an epoch's end, the time limit or --checkpoint-every saved it
            self.save_checkpoint(step)
        status = "time-limit" if timed_out else "interrupted"
        if self.log is not None:
            self.log.write(status, step=step)
        self.result.status = status

    # -- files -----------------------------------------------------------------------------

    def save_checkpoint(self, at: int) -> None:
        """Everything --resume needs to continue from step ``at`` (every rank's RNG states)."""
        states = all_gather(self.dist, rng_state())
        with errors_shared(self.dist):  # a failed write (disk full) stops every rank
            if self.dist.is_main:
                write_checkpoint(
                    self.checkpoint_path,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "version": CHECKPOINT_VERSION,
                        "config": json.dumps(self.config.as_dict(), sort_keys=True),
                        "step": at,
                        "best_psnr": self.best,
                        "log_records": self.log.records if self.log else 0,
                        # the same on every rank: the summed losses are all-reduced ones
                        "log_window": {"sums": dict(self.window), "steps": self.window_steps},
                        "data_fingerprint": self.manifest.fingerprint,
                        "init_sha256": self.init_sha,
                        "init_stage_steps": (self.provenance.get("init") or {}).get("stage_steps"),
                        "critic_init": self.provenance.get("critic_init"),
                        "psnr_origin": self.provenance.get("psnr_origin"),
                        "world_size": self.dist.world,
                        "state": self.trainer.state_dict(),
                        "rng": states,
                    },
                )
        self.saved_at = at  # on every rank: they decide alike whether to save again
        if self.dist.is_main:  # after saved_at: a second Ctrl-C in the callback reports it
            self.emit("checkpoint", step=at, path=str(self.checkpoint_path))
        barrier(self.dist)

    def export(self, name: str, at: int, metrics: dict[str, float]) -> Path:
        """The generator as a weights file for `upsample`, with the run's provenance."""
        path = self.out / name
        epoch = math.ceil(at / self.config.steps_per_epoch)  # as the log counts it
        info = dict(self.provenance, step=at, epoch=epoch, validation=metrics)
        init = self.provenance.get("init") or {}
        info["stage_steps"] = at + int(init.get("stage_steps") or 0)
        self._save(path, self.trainer.generator.state_dict(), self.config.network, info)
        return path

    def export_critic(self, at: int) -> Path:
        """The critic of step ``at``, so that a later run continues the GAN stage with what it
        learnt (``--init-critic``) instead of a new critic that must first catch up."""
        assert self.trainer.critic is not None
        path = self.out / CRITIC_NAME
        info = dict(self.provenance, step=at, role="critic")
        self._save(path, self.trainer.critic.state_dict(), self.config.critic, info)
        return path

    def _save(
        self, path: Path, state: dict[str, Any], network: NetworkConfig, info: dict[str, Any]
    ) -> None:
        try:
            save_weights(
                path, state, network, self.manifest.degradation, provenance=info, overwrite=True
            )
        except (OSError, RuntimeError, SafetensorError) as exc:
            reason = write_failure(exc, self.out, tensor_bytes(state))
            raise OutputError(f"{path}: could not write the weights ({reason})") from exc

    def finish(self) -> TrainResult:
        """Log the end of a finished run and say where the weights are."""
        result, out = self.result, self.out
        result.step = self.step
        result.best_psnr = self.best
        if result.status == "done" and self.log is not None:
            inputs = self.input_metrics or {}
            self.log.write(
                "done", step=self.step, best_val_psnr=self.best, input_psnr=inputs.get("psnr")
            )
        if result.last_weights is None and (out / LAST_NAME).exists():
            result.last_weights = out / LAST_NAME
        if result.best_weights is None and (out / BEST_NAME).exists():
            result.best_weights = out / BEST_NAME
        self.emit("end", status=result.status, step=self.step)
        return result


def _fetcher(
    sampler: PatchSampler, config: TrainConfig, dist: DistInfo, device: str
) -> Callable[[tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]]:
    """``fetch(key)``: this rank's slice of the key's global batch (pinned for CUDA copies)."""
    pin = device.startswith("cuda")

    def fetch(key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = sampler.batch(key, config.batch_size, offset=config.batch_size * dist.rank)
        tensors = (torch.from_numpy(lr), torch.from_numpy(hr))
        return (tensors[0].pin_memory(), tensors[1].pin_memory()) if pin else tensors

    return fetch


def _reduce_losses(
    losses: dict[str, Any], stop: bool, time_up: bool, dist: DistInfo, device: str
) -> dict[str, float]:
    """Losses averaged over ranks, and the two reasons to stop (a request, the time limit)
    agreed by all, in one all-reduce: ranks that disagreed on either would part ways (one
    validating, the other training) and wait for each other for ever."""
    names = sorted(losses)
    values = [float(stop), float(time_up)] + [float(losses[n]) for n in names]
    if dist.enabled:
        import torch.distributed as tdist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        tdist.all_reduce(tensor)
        values = tensor.tolist()
        values = values[:2] + [v / dist.world for v in values[2:]]
    out = dict(zip(names, values[2:], strict=True))
    out["_stop"], out["_time_up"] = values[0], values[1]
    return out


def _stop_agreed(stop: StopRequest, dist: DistInfo, device: str) -> bool:
    """Whether a stop was asked for on any rank (all ranks must stop at the same step): one
    all-reduce of one number, since every step asks."""
    if not dist.enabled:
        return stop.requested
    import torch.distributed as tdist

    flag = torch.tensor([float(stop.requested)], device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return bool(flag.item())


# --- setting a run up -------------------------------------------------------------------------


def _resolved_config(config: TrainConfig, device: str) -> TrainConfig:
    """--amp's default made explicit (the checkpoint stores it); cuDNN set by --deterministic."""
    cuda = device.startswith("cuda")
    config = replace(config, amp=bool(config.amp if config.amp is not None else cuda))
    if cuda:
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    return config


def _restore(
    trainer: Trainer, payload: dict[str, Any], dist: DistInfo
) -> tuple[int, float | None, int]:
    """Load a checkpoint's states (this rank's RNG states); return (step, best PSNR, records
    of the log that it follows)."""
    trainer.load_state_dict(payload["state"])
    step, best, log_keep = int(payload["step"]), payload["best_psnr"], payload["log_records"]
    states = payload["rng"]
    set_rng_state(states[dist.rank] if dist.rank < len(states) else states[0])
    return step, best, log_keep


def _log_window(payload: dict[str, Any], path: Path) -> tuple[dict[str, float], int]:
    """A checkpoint's loss sums since its last "train" record, and their steps: without them a
    resumed run's next record would average only the steps after the resume. A checkpoint of an
    earlier version has none: the window starts empty."""
    window = payload.get("log_window")
    if window is None:
        return {}, 0
    try:
        sums = {str(k): float(v) for k, v in window["sums"].items()}
        steps = int(window["steps"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        reason = f"its log window: {exc}"
        raise InputError(f"{path}: checkpoint is unreadable or corrupt ({reason})") from exc
    return sums, steps


def _open_run_folder(
    config: TrainConfig,
    manifest: Manifest,
    dist: DistInfo,
    *,
    resume: bool,
    log_keep: int,
    step: int,
    device: str,
    warn: Callable[[str], None],
) -> JsonlLog | None:
    """Rank 0's log (cut back to the checkpoint's records) and run.json: written for a new run,
    a "resumes" entry added for a resume; a folder that cannot be written stops every rank.
    None on the other ranks."""
    out = Path(config.out)
    log: JsonlLog | None = None
    with errors_shared(dist):
        if dist.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                log = JsonlLog(out / LOG_NAME, keep=log_keep)
                if resume:
                    if not append_resume(out / RUN_NAME, _resume_entry(step, dist, device)):
                        warn(f"{out / RUN_NAME}: not a JSON object; this resume is not recorded")
                else:
                    with atomic_path(out / RUN_NAME, overwrite=True) as tmp:
                        record = _run_record(config, manifest, dist)
                        tmp.write_text(json.dumps(record, indent=1) + "\n")
            except OSError as exc:
                reason = exc.strerror or exc
                raise OutputError(f"{out}: cannot write the run folder ({reason})") from exc
    return log


def _run_record(config: TrainConfig, manifest: Manifest, dist: DistInfo) -> dict[str, Any]:
    return {
        "config": config.as_dict(),
        "data_fingerprint": manifest.fingerprint,
        "world_size": dist.world,
        "mrisr_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
    }


def _resume_entry(step: int, dist: DistInfo, device: str) -> dict[str, Any]:
    """What run.json records of a resume: a run may go on on another machine, torch version,
    commit or number of processes than it started with."""
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        "step": step,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "world_size": dist.world,
        "mrisr_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "device": device,
    }


def stage_steps_of(weights: WeightsFile) -> int:
    """Steps of its stage behind a weights file: its run's, plus those of the same-stage file that
    run started from (``--init``), and so on back; so a schedule split over sessions adds up."""
    provenance = weights.provenance
    return int(provenance.get("stage_steps", provenance.get("step") or 0))


def _psnr_origin(config: TrainConfig, init: WeightsFile | None, payload: dict[str, Any]) -> Any:
    """GAN stage: the sha256 of the PSNR model it is tuned from, also through GAN runs continued
    from another's file (``upsample`` warns when a blend's GAN model names another)."""
    if config.stage != "gan":
        return None
    if init is None:  # a resumed call whose --init file moved: what the checkpoint recorded
        return payload.get("psnr_origin")
    recorded = init.provenance if isinstance(init.provenance, dict) else {}
    if recorded.get("stage") != "gan":
        return init.sha256
    if isinstance(recorded.get("psnr_origin"), str):
        return recorded["psnr_origin"]
    started = recorded.get("init")  # a GAN file from before psnr_origin: its own --init
    return started.get("sha256") if isinstance(started, dict) else None


def _critic_init_info(critic: WeightsFile | None, payload: dict[str, Any]) -> Any:
    if critic is not None:
        recorded = critic.provenance if isinstance(critic.provenance, dict) else {}
        return {"path": str(critic.path), "sha256": critic.sha256, "step": recorded.get("step")}
    return payload.get("critic_init")  # a resumed call: what the run started from


def _provenance_base(
    config: TrainConfig, manifest: Manifest, dist: DistInfo, inputs: RunInputs
) -> dict[str, Any]:
    init, payload = inputs.init, inputs.payload
    init_info = None
    if init is not None:
        init_info = {
            "path": str(init.path),
            "sha256": init.sha256,
            "step": init.provenance.get("step"),
            "stage_steps": stage_steps_of(init)
            if init.provenance.get("stage") == config.stage
            else 0,
        }
    elif payload.get("init_sha256"):  # resumed without the file: the path it started from
        started = json.loads(payload["config"]).get("init")
        init_info = {"path": started, "sha256": payload["init_sha256"]}
        if payload.get("init_stage_steps"):  # so a resumed continuation's steps still add up
            init_info["stage_steps"] = payload["init_stage_steps"]
    return {
        "stage": config.stage,
        "data_dir": str(Path(config.data).resolve()),
        "data_manifest_sha256": manifest.sha256,
        "data_fingerprint": manifest.fingerprint,
        "git_commit": git_commit(),
        "init": init_info,
        # the critic's starting file (a resumed call reads it from the checkpoint, not the file)
        "critic_init": _critic_init_info(inputs.critic_init, payload),
        "psnr_origin": _psnr_origin(config, init, payload),
        "world_size": dist.world,
        "global_batch": config.batch_size * dist.world,
        "torch_version": torch.__version__,
        "config": config.as_dict(),
    }
