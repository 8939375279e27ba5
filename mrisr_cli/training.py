"""Training the generators: the PSNR stage (L1, Adam) and the GAN stage (WGAN-GP, patch critic).

Why it is built this way:

- **Reproducible and resumable.** Batches are a pure function of the step (see
  :mod:`mrisr_cli.patches`), the gradient-penalty interpolation weights likewise, and a checkpoint
  holds the model, optimiser, AMP scaler, RNG states and step. So ``--resume`` after an
  interruption continues bit for bit the run that would have happened without it (on the CPU,
  where the kernels are deterministic; on a GPU up to cuDNN's algorithm choice).
- **Safe to interrupt.** Ctrl-C or SIGTERM (SLURM's warning at the time limit) sets a flag; the
  step in progress finishes, a checkpoint is written and training returns. Checkpoints and
  weights are written to a temporary file and renamed, so a full disk leaves the previous ones.
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

Losses (SPEC "Losses and training"; the critic scores how *fake* a patch looks):
``L_G = L1(sr, hr) + lambda_adv * mean D(sr)`` and
``L_D = mean D(hr) - mean D(sr) + lambda_gp * mean (||grad D(x_hat)||_2 - 1)^2`` with
``x_hat = gamma * sr + (1 - gamma) * hr``, ``gamma ~ U(0, 1)`` per sample, shape (B, 1, 1, 1, 1).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from mrisr_cli import __version__
from mrisr_cli.batchnorm import batchnorm_layers, recalibrate_batchnorm, sampler_batches
from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.errors import DeviceError, InputError, MrisrError, OutputError, WeightsError
from mrisr_cli.inference import InferenceOptions, resolve_device, super_resolve
from mrisr_cli.networks import GENERATORS, NetworkConfig, build_network
from mrisr_cli.patches import PatchOptions, PatchSampler, Prefetcher, open_split
from mrisr_cli.prepare import MANIFEST_NAME, Manifest, load_manifest
from mrisr_cli.tiling import PAPER_PATCH
from mrisr_cli.volumes import atomic_path, os_reason
from mrisr_cli.weights import WeightsFile, load_weights, save_weights

STAGES: tuple[str, ...] = ("psnr", "gan")
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
RUN_NAME = "run.json"
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"
CHECKPOINT_FORMAT = "mrisr-checkpoint"
CHECKPOINT_VERSION = 1

#: Settings that may change when a run is resumed: they do not change what is computed.
RESUME_MAY_CHANGE = frozenset(
    {
        "data",
        "out",
        "init",
        "epochs",
        "device",
        "workers",
        "prefetch",
        "log_every",
        "checkpoint_every",
        "checkpointing",
        "compile",
        "val_batch_size",
        "batch_size",  # compared as the global batch (batch x processes) instead
        "time_limit",
        "precise_bn",  # only the exported BatchNorm buffers, recomputed from scratch each time
    }
)
#: Settings the PSNR stage never reads: on its resume they may change (the CLI derives
#: --critic-lr from --lr, so a new --lr must not be reported as a new --critic-lr too).
GAN_ONLY = frozenset(
    {"critic", "critic_lr", "lambda_adv", "lambda_gp", "critic_steps", "critic_warmup"}
)
OPTION_NAMES = {
    "network": "--net/--net-params",
    "critic": "--critic-params",
    "flip_axes": "--flips",
}

EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (stored in its checkpoint and weights provenance)."""

    stage: str
    data: str
    out: str
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig("rrdg"))
    critic: NetworkConfig = field(default_factory=lambda: NetworkConfig("patch_discriminator"))
    init: str | None = None
    epochs: int = 100
    steps_per_epoch: int = 1000
    batch_size: int = 4  # per process
    lr: float = 1e-4
    critic_lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    lr_decay: float = 0.95
    lr_decay_steps: int = 10_000
    lambda_adv: float = 0.1
    lambda_gp: float = 10.0
    critic_steps: int = 5
    critic_warmup: int = 0
    patch: tuple[int, int, int] = PAPER_PATCH
    foreground_fraction: float = 0.9
    flip_axes: tuple[int, ...] = (0, 1, 2)
    val_patch: tuple[int, int, int] = PAPER_PATCH
    val_batch_size: int = 4
    amp: bool | None = None  # None: on for CUDA, off for the CPU
    checkpointing: bool = True
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    prefetch: int = 4
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch only
    time_limit: float = 0.0  # seconds of training in this call; 0: none
    precise_bn: int = 32  # training patches for BatchNorm statistics before validation; 0: off

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise InputError(f"--stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.network.name not in GENERATORS:
            raise InputError(
                f"--net must be one of {', '.join(GENERATORS)}, not {self.network.name!r}"
            )
        positive = ("epochs", "steps_per_epoch", "batch_size", "critic_steps", "lr_decay_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        # written so that NaN fails too (every comparison with NaN is false)
        for name in ("lr", "critic_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                option = name.replace("_", "-")
                raise InputError(f"--{option} must be a positive number, got {value}")
        for name in ("lambda_adv", "lambda_gp"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                option = name.replace("_", "-")
                raise InputError(f"--{option} must be a number >= 0, got {value}")
        if self.critic_warmup < 0:
            raise InputError("--critic-warmup cannot be negative")
        if self.time_limit < 0:
            raise InputError("--time-limit cannot be negative")
        if any(p < 8 for p in self.patch):
            raise InputError(f"--patch {self.patch} is too small (at least 8 voxels per axis)")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists) for the checkpoint, run.json and provenance."""
        raw = asdict(self)
        raw["network"] = {"name": self.network.name, "params": self.network.params}
        raw["critic"] = {"name": self.critic.name, "params": self.critic.params}
        return json.loads(json.dumps(raw))


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
    validation: dict[str, float] = field(default_factory=dict)


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C stopped training mid-step or mid-validation. Still a KeyboardInterrupt,
    but it says what is on disk, so the CLI can tell the user whether --resume has a start."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path, saved_step: int | None):
        super().__init__(step)
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint
        self.saved_step = saved_step  # the step checkpoint.pt holds; None: there is none


# --- distributed helpers --------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a DistributedDataParallel job (1 process when not launched so)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> DistInfo:
    """Rank and world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or, for a plain
    ``srun`` launch with MASTER_ADDR/MASTER_PORT exported, from SLURM's task variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in env and "SLURM_PROCID" in env:
        info = DistInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"] = str(info.rank), str(info.world)
        env["LOCAL_RANK"] = str(info.local_rank)
        return info
    return DistInfo()


def worker_threads(threads: int | None) -> int | None:
    """CPU threads per process: under torchrun with SLURM_CPUS_PER_TASK, that share per worker."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if threads is None and local > 1 and slurm.isdigit():
        return max(1, int(slurm) // local)
    return threads


def init_distributed(device: str) -> tuple[DistInfo, str, bool]:
    """Join the process group if launched by torchrun/srun; return (info, device, we_started)."""
    import torch.distributed as dist

    info = dist_from_env()
    if not info.enabled:
        return info, resolve_device(device), False
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        resolved = f"cuda:{info.local_rank}"
    else:
        resolved = resolve_device(device)
    if dist.is_initialized():
        return info, resolved, False
    backend = "nccl" if resolved.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world)
    return info, resolved, True


def _all_gather(info: DistInfo, obj: Any) -> list[Any]:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _broadcast_error(info: DistInfo, message: str | None) -> None:
    """Raise on every rank when rank 0 met a user error, so no rank waits forever."""
    messages = _all_gather(info, message)
    first = next((m for m in messages if m), None)
    if first:
        raise MrisrError(first)


# --- losses -------------------------------------------------------------------------------


def l1_loss(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """The element-wise L1 loss, computed in float32 also under autocast."""
    return F.l1_loss(sr.float(), hr.float())


def interpolation_weights(
    seed: int, key: tuple[int, ...], global_batch: int, offset: int, size: int
) -> torch.Tensor:
    """gamma ~ U(0, 1), one per sample, shaped (B, 1, 1, 1, 1) for 3D volumes; a pure function of
    (seed, key) over the global batch, so a DDP rank's slice equals the single-process values."""
    state = np.random.SeedSequence([seed, *key, 0x6A4D]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    gamma = torch.rand((global_batch, 1, 1, 1, 1), generator=generator)
    return gamma[offset : offset + size]


def critic_loss(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    gamma: torch.Tensor,
    lambda_gp: float,
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_D`` with the two-sided gradient penalty; returns (loss, D(sr) - D(hr), penalty).

    Real, fake and interpolated patches go through the critic in one batch (its norms are per
    sample, so this changes nothing but makes one DistributedDataParallel forward). ``scale`` is
    the AMP loss scale: the input gradient is taken of the scaled score and unscaled, as in the
    PyTorch AMP recipe for gradient penalties.
    """
    if gamma.dim() != 5 or gamma.shape[1:] != (1, 1, 1, 1):
        raise ValueError("gamma must have shape (B, 1, 1, 1, 1)")
    fake = fake.detach()
    x_hat = (gamma * fake + (1.0 - gamma) * real).requires_grad_(True)
    batch = real.shape[0]
    scores = critic(torch.cat([real, fake, x_hat])).float()
    d_real, d_fake, d_hat = scores.split(batch)
    (grad,) = torch.autograd.grad(d_hat.sum() * scale, x_hat, create_graph=True)
    grad = grad.float() / scale
    penalty = ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()
    distance = d_fake.mean() - d_real.mean()
    return d_real.mean() - d_fake.mean() + lambda_gp * penalty, distance.detach(), penalty.detach()


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


# --- RNG states -------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in weights_only-loadable types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints, logs, weights -----------------------------------------------------------


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def write_failure(exc: BaseException, folder: Path, needed: int) -> str:
    """Why a write into ``folder`` failed, in words. torch.save reports a full disk as a
    RuntimeError of its zip writer ("[enforce fail at inline_container.cc:672] . unexpected pos
    60672 vs 60576"), which tells a user nothing; the free space does."""
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on device"
        if exc.errno == errno.EDQUOT:
            return "disk quota exceeded"
        return os_reason(exc)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < needed:
        mib = 2**20
        return f"no space left on device ({free / mib:.1f} MiB free, {needed / mib:.1f} needed)"
    return "the write failed (disk full or quota exceeded?)"


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, renamed into place: a failed write (disk full) leaves
    the previous checkpoint as it was, and the message says whether there is one."""
    try:
        with atomic_path(path, overwrite=True) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:
        reason = write_failure(exc, path.parent, _tensor_bytes(payload))
        kept = (
            "the previous checkpoint is kept"
            if path.is_file()
            else "no checkpoint has been saved yet"
        )
        raise OutputError(f"{path}: could not write the checkpoint ({reason}); {kept}") from exc


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling code (``weights_only=True``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no checkpoint to resume from") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise InputError(f"{path}: checkpoint is unreadable or corrupt ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an mrisr training checkpoint")
    return payload


def git_commit() -> str:
    """The source commit (``MRISR_GIT_COMMIT`` in containers without .git), '-dirty' if edited."""
    if os.environ.get("MRISR_GIT_COMMIT"):
        return os.environ["MRISR_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


class JsonlLog:
    """Append-only JSON-lines log of one run (rank 0 only), counted so a resume can cut it back
    to the records written before its checkpoint."""

    def __init__(self, path: Path, *, keep: int | None = None) -> None:
        self.path = Path(path)
        self.records = 0
        if keep is not None and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)[:keep]
            with atomic_path(self.path, overwrite=True) as tmp:
                tmp.write_text("".join(lines))
            self.records = len(lines)

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=_json_default) + "\n")
        except OSError as exc:
            raise OutputError(f"{self.path}: could not write the log ({exc.strerror})") from exc
        self.records += 1


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's JSONL log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- stop requests ----------------------------------------------------------------------------


class StopRequest:
    """Ctrl-C / SIGTERM set a flag that the loop reads after each step; a second Ctrl-C stops
    at once (KeyboardInterrupt). Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
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
    """Mean PSNR/SSIM/NRMSE (whole volume and inside the mask) over the validation volumes,
    each super-resolved whole by the stitching code of `upsample`; ranks share the subjects."""
    from mrisr_cli.metrics import image_metrics

    rows = []
    for subject in subjects[dist.rank :: dist.world]:
        lr = np.asarray(subject.lr, dtype=np.float32)
        hr = np.asarray(subject.hr, dtype=np.float32)
        sr = super_resolve(lr, model, options)
        scores = image_metrics(hr, sr, np.asarray(subject.mask, dtype=bool), device=options.device)
        rows.append(scores.as_dict())
    model.train()
    gathered = [row for part in _all_gather(dist, rows) for row in part]
    if not gathered:
        return {}
    return {k: float(np.mean([row[k] for row in gathered])) for k in gathered[0]}


# --- the training run -------------------------------------------------------------------------


def _differences(before: dict[str, Any], now: dict[str, Any], skip: frozenset[str]) -> list[str]:
    names = []
    for key in sorted(set(before) | set(now)):
        if key in skip or before.get(key) == now.get(key):
            continue
        option = OPTION_NAMES.get(key, "--" + key.replace("_", "-"))
        names.append(f"{option} was {before.get(key)!r}, now {now.get(key)!r}")
    return names


def check_init(init: WeightsFile, config: TrainConfig, degradation: DegradationConfig) -> None:
    """The starting weights must be the same network, made from data prepared the same way."""
    if init.network.name != config.network.name:
        raise WeightsError(
            f"{init.path}: holds a {init.network.name!r} network, but --net is "
            f"{config.network.name!r}"
        )
    if init.network.params != config.network.params:
        raise WeightsError(
            f"{init.path}: network parameters {init.network.params} differ from "
            f"--net-params {config.network.params}"
        )
    if init.degradation.to_json() != degradation.to_json():
        diff = _differences(
            json.loads(init.degradation.to_json()), json.loads(degradation.to_json()), frozenset()
        )
        raise WeightsError(
            f"{init.path}: was trained on data prepared differently from --data "
            f"({'; '.join(diff).replace('--', '')})"
        )


def _fetcher(
    sampler: PatchSampler, config: TrainConfig, dist: DistInfo, device: str
) -> Callable[[tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]]:
    pin = device.startswith("cuda")

    def fetch(key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = sampler.batch(key, config.batch_size, offset=config.batch_size * dist.rank)
        tensors = (torch.from_numpy(lr), torch.from_numpy(hr))
        return (tensors[0].pin_memory(), tensors[1].pin_memory()) if pin else tensors

    return fetch


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
    def emit(kind: str, **payload: Any) -> None:
        if on_event is not None and dist.is_main:
            on_event(kind, payload)

    cuda = device.startswith("cuda")
    config = replace(config, amp=bool(config.amp if config.amp is not None else cuda))
    if cuda:
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    out = Path(config.out)
    manifest = _load_data(Path(config.data))
    checkpoint_path = out / CHECKPOINT_NAME
    payload: dict[str, Any] = {}
    if resume:
        payload = _read_run_checkpoint(out)
    elif checkpoint_path.exists():
        raise OutputError(
            f"{out}: already holds a training run; continue it with --resume or choose "
            "another --out"
        )
    else:
        _refuse_trained_weights(out)
    init = _load_init(config, manifest, resume, payload, lambda m: emit("warning", message=m))
    if resume:
        _check_resume(payload, config, manifest, init, dist)
        _check_schedule(payload, config)
    init_sha = init.sha256 if init else str(payload.get("init_sha256", ""))
    trainer = Trainer(config, device=device, dist=dist, init=init)
    step, best = 0, None
    log_keep = 0  # a fresh run starts a fresh log
    if resume:
        trainer.load_state_dict(payload["state"])
        step, best, log_keep = int(payload["step"]), payload["best_psnr"], payload["log_records"]
        states = payload["rng"]
        set_rng_state(states[dist.rank] if dist.rank < len(states) else states[0])
    trainer.wrap()
    train_subjects = open_split(manifest, "train")
    val_subjects = open_split(manifest, "val")
    sampler = PatchSampler(
        train_subjects,
        PatchOptions(config.patch, config.foreground_fraction, tuple(config.flip_axes)),
        seed=config.seed,
    )
    log: JsonlLog | None = None
    error = None
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            log = JsonlLog(out / LOG_NAME, keep=log_keep)
            if not resume:
                with atomic_path(out / RUN_NAME, overwrite=True) as tmp:
                    tmp.write_text(json.dumps(_run_record(config, manifest, dist), indent=1) + "\n")
        except OSError as exc:
            error = f"{out}: cannot write the run folder ({exc.strerror or exc})"
    _broadcast_error(dist, error)
    provenance = _provenance_base(config, manifest, dist, init, payload)
    val_options = InferenceOptions(
        patch=tuple(config.val_patch),  # type: ignore[arg-type]
        batch_size=config.val_batch_size,
        device=device,
        half=config.amp,
    )
    total = config.total_steps
    if log is not None:
        log.write(
            "resume" if resume else "start",
            step=step,
            total_steps=total,
            world_size=dist.world,
            device=device,
            train_subjects=len(train_subjects),
            val_subjects=len(val_subjects),
        )
    emit("start", step=step, total_steps=total, resumed=resume, device=device, world=dist.world)
    result = TrainResult("done", step, total, out, best_psnr=best)
    if not val_subjects:
        emit("warning", message="no validation subjects in the data folder: no best weights")

    def keys() -> Iterator[tuple[int, ...]]:
        for s in range(step, total):
            for k in range(trainer.fetches_per_step(s)):
                yield (s, k)

    saved_at: int | None = step if resume else None  # the step checkpoint.pt holds

    def save_checkpoint(at: int) -> None:
        nonlocal saved_at
        states = _all_gather(dist, rng_state())
        if dist.is_main:
            write_checkpoint(
                checkpoint_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "config": json.dumps(config.as_dict(), sort_keys=True),
                    "step": at,
                    "best_psnr": best,
                    "log_records": log.records if log else 0,
                    "data_fingerprint": manifest.fingerprint,
                    "init_sha256": init_sha,
                    "world_size": dist.world,
                    "state": trainer.state_dict(),
                    "rng": states,
                },
            )
            saved_at = at
            emit("checkpoint", step=at, path=str(checkpoint_path))
        _barrier(dist)

    def export(name: str, at: int, metrics: dict[str, float]) -> Path:
        path = out / name
        epoch = math.ceil(at / config.steps_per_epoch)  # as the log counts it
        info = dict(provenance, step=at, epoch=epoch, validation=metrics)
        try:
            save_weights(
                path,
                trainer.generator.state_dict(),
                config.network,
                manifest.degradation,
                provenance=info,
                overwrite=True,
            )
        except (OSError, RuntimeError, SafetensorError) as exc:
            reason = write_failure(exc, out, _tensor_bytes(trainer.generator.state_dict()))
            raise OutputError(f"{path}: could not write the weights ({reason})") from exc
        return path

    window: dict[str, float] = {}
    window_steps = 0
    epoch_wait = epoch_time = 0.0
    epoch_patches = 0
    fetch = _fetcher(sampler, config, dist, device)
    try:
        with (
            StopRequest() as stop,
            Prefetcher(fetch, keys(), depth=config.prefetch, workers=config.workers) as prefetch,
        ):
            batches = (
                (lr.to(device, non_blocking=True), hr.to(device, non_blocking=True))
                for lr, hr in prefetch
            )
            loop_started = time.perf_counter()
            while step < total:
                started, waited = time.perf_counter(), prefetch.wait_seconds
                patches = trainer.fetches_per_step(step) * config.batch_size * dist.world
                losses = trainer.step(step, batches)
                time_up = bool(config.time_limit) and (
                    time.perf_counter() - loop_started >= config.time_limit
                )
                values = _reduce_losses(losses, stop.requested or time_up, dist, device)
                stopping = bool(values.pop("_stop"))
                timed_out = stopping and not stop.requested
                step += 1
                elapsed = time.perf_counter() - started
                epoch_time += elapsed
                epoch_wait += prefetch.wait_seconds - waited
                epoch_patches += patches
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise MrisrError(
                        f"training diverged at step {step} ({bad[0]} is {values[bad[0]]}); lower "
                        "--lr or resume from the last checkpoint"
                    )
                for k, v in values.items():
                    window[k] = window.get(k, 0.0) + v
                window_steps += 1
                emit("step", step=step, losses=values, lr=config.lr * _lr_factor(config, step - 1))
                if log is not None and (step % config.log_every == 0 or step == total):
                    log.write(
                        "train",
                        step=step,
                        epoch=(step - 1) // config.steps_per_epoch + 1,
                        lr=config.lr * _lr_factor(config, step - 1),
                        **{k: v / window_steps for k, v in window.items()},
                    )
                    window, window_steps = {}, 0
                # a time limit ends the call like an epoch: validated, exported weights
                if step % config.steps_per_epoch == 0 or (timed_out and step < total):
                    epoch = math.ceil(step / config.steps_per_epoch)
                    emit("validating", step=step, epoch=epoch, subjects=len(val_subjects))
                    if config.precise_bn and batchnorm_layers(trainer.generator):
                        recalibrate_batchnorm(
                            trainer.generator,
                            sampler_batches(sampler, config.precise_bn, config.batch_size, device),
                        )
                    metrics = validate(trainer.generator, val_subjects, val_options, dist)
                    data_wait = epoch_wait / max(epoch_time, 1e-9)
                    rate = epoch_patches / max(epoch_time, 1e-9)
                    improved = bool(metrics) and (best is None or metrics["psnr"] > best)
                    if improved:
                        best = metrics["psnr"]
                    if dist.is_main:
                        result.last_weights = export(LAST_NAME, step, metrics)
                        if improved:
                            result.best_weights = export(BEST_NAME, step, metrics)
                        if log is not None:
                            log.write(
                                "epoch",
                                step=step,
                                epoch=epoch,
                                data_wait_fraction=data_wait,
                                patches_per_second=rate,
                                best=improved,
                                **{f"val_{k}": v for k, v in metrics.items()},
                            )
                    emit(
                        "epoch",
                        step=step,
                        epoch=epoch,
                        metrics=metrics,
                        best=improved,
                        data_wait_fraction=data_wait,
                        patches_per_second=rate,
                    )
                    epoch_wait = epoch_time = 0.0
                    epoch_patches = 0
                    save_checkpoint(step)
                elif config.checkpoint_every and step % config.checkpoint_every == 0:
                    save_checkpoint(step)
                if stopping and step < total:
                    if step % config.steps_per_epoch and not timed_out:  # else it was just written
                        save_checkpoint(step)
                    status = "time-limit" if timed_out else "interrupted"
                    if log is not None:
                        log.write(status, step=step)
                    result.status = status
                    break
    except KeyboardInterrupt as exc:  # a second Ctrl-C (StopRequest): say what is on disk
        raise StoppedAtOnce(step, total, checkpoint_path, saved_at) from exc
    result.step = step
    result.best_psnr = best
    if result.status == "done" and log is not None:
        log.write("done", step=step, best_val_psnr=best)
    if result.last_weights is None and (out / LAST_NAME).exists():
        result.last_weights = out / LAST_NAME
    if result.best_weights is None and (out / BEST_NAME).exists():
        result.best_weights = out / BEST_NAME
    emit("end", status=result.status, step=step)
    return result


def _reduce_losses(
    losses: dict[str, Any], stop: bool, dist: DistInfo, device: str
) -> dict[str, float]:
    """Losses averaged over ranks, and the stop flag agreed by all (one all-reduce)."""
    names = sorted(losses)
    values = [float(stop)] + [float(losses[n]) for n in names]
    if dist.enabled:
        import torch.distributed as tdist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        tdist.all_reduce(tensor)
        values = tensor.tolist()
        values = [values[0]] + [v / dist.world for v in values[1:]]
    out = dict(zip(names, values[1:], strict=True))
    out["_stop"] = values[0]
    return out


def _load_data(path: Path) -> Manifest:
    """The data folder's manifest; a manifest named instead of its folder gets a hint."""
    if path.is_file():
        if path.name == MANIFEST_NAME:
            raise InputError(
                f"{path}: is the manifest; give --data the folder that holds it ({path.parent})"
            )
        raise InputError(f"{path}: is a file; give --data the folder made by `mrisr prepare`")
    return load_manifest(path)


def _trained_weights(out: Path) -> list[str]:
    return [name for name in (BEST_NAME, LAST_NAME) if (out / name).exists()]


def _refuse_trained_weights(out: Path) -> None:
    """A run folder whose checkpoint is gone (a full disk, deleted) still holds trained
    weights: a fresh start would silently overwrite them."""
    names = _trained_weights(out)
    if names:
        raise OutputError(
            f"{out}: already holds trained weights ({', '.join(names)}) but no {CHECKPOINT_NAME}; "
            f"choose another --out (--resume needs {CHECKPOINT_NAME}; --init "
            f"{out / names[-1]} starts a new run from these weights)"
        )


def _read_run_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint --resume continues; without one, say what the folder still offers."""
    names = _trained_weights(out)
    if not (out / CHECKPOINT_NAME).exists() and names:
        raise InputError(
            f"{out / CHECKPOINT_NAME}: no checkpoint to resume from, only trained weights "
            f"({', '.join(names)}); start a new run with another --out and --init "
            f"{out / names[-1]} to train on from them"
        )
    return read_checkpoint(out / CHECKPOINT_NAME)


def _check_schedule(payload: dict[str, Any], config: TrainConfig) -> None:
    """A resume with fewer --epochs than already trained would report "done: 31 of 30 steps"."""
    step = int(payload["step"])
    if step > config.total_steps:
        more = step // config.steps_per_epoch + 1
        raise InputError(
            f"{config.out}: the run is already at step {step}, past the {config.total_steps} "
            f"steps of --epochs {config.epochs} x --steps-per-epoch {config.steps_per_epoch}; "
            f"give --epochs {more} or more to train on"
        )


def load_init_weights(path: Path, *, expect_network: str | None = None) -> WeightsFile:
    """:func:`load_weights`, pointing from a run's checkpoint (a pickle) to its weights files."""
    path = Path(path)
    if path.name == CHECKPOINT_NAME and path.is_file():
        raise WeightsError(
            f"{path}: is a training checkpoint, not weights; give {path.parent / BEST_NAME} or "
            f"{path.parent / LAST_NAME}"
        )
    return load_weights(path, expect_network=expect_network)


def _load_init(
    config: TrainConfig,
    manifest: Manifest,
    resume: bool,
    payload: dict[str, Any],
    warn: Callable[[str], None],
) -> WeightsFile | None:
    """The --init weights. On --resume the checkpoint holds the weights, so a file that has
    moved since is not needed; one that is there must be the run's own (see _check_resume)."""
    if config.init is None:
        if config.stage == "gan" and not resume:
            raise InputError(
                "--stage gan starts from the PSNR model: give --init PSNR_RUN/best.safetensors"
            )
        return None
    path = Path(config.init)
    if resume and not path.exists():
        warn(f"--init {path}: not found; ignored, since {CHECKPOINT_NAME} holds the run's weights")
        return None
    init = load_init_weights(path, expect_network=config.network.name)
    check_init(init, config, manifest.degradation)
    recorded = init.provenance.get("stage") if isinstance(init.provenance, dict) else None
    if not resume and recorded == "gan":
        hint = (
            "the GAN stage usually starts from PSNR weights (PSNR_RUN/best.safetensors)"
            if config.stage == "gan"
            else "--stage psnr trains them on with the L1 loss alone"
        )
        warn(
            f"--init {path}: holds GAN-stage weights (their provenance records stage 'gan'); {hint}"
        )
    return init


def _check_resume(
    payload: dict[str, Any],
    config: TrainConfig,
    manifest: Manifest,
    init: WeightsFile | None,
    dist: DistInfo,
) -> None:
    """Refuse to continue a run with settings that would change what it computes."""
    before = json.loads(payload["config"])
    may_change = RESUME_MAY_CHANGE | (GAN_ONLY if config.stage == "psnr" else frozenset())
    diffs = _differences(before, config.as_dict(), may_change)
    global_before = int(before["batch_size"]) * int(payload["world_size"])
    global_now = config.batch_size * dist.world
    if global_before != global_now:
        diffs.append(
            f"the global batch (--batch-size x processes) was {global_before}, now {global_now}"
        )
    if payload["data_fingerprint"] != manifest.fingerprint:
        diffs.append(f"--data {config.data} holds other data than the run was started on")
    if init is not None and not payload.get("init_sha256"):
        diffs.append(f"--init {config.init} is given, but the run was started without --init")
    elif init is not None and init.sha256 != payload["init_sha256"]:
        diffs.append(f"--init {config.init} is another file than the run was started from")
    if diffs:
        raise InputError(
            f"{config.out}: cannot resume with different settings: {'; '.join(diffs)} "
            "(resume with the original settings, or start a new run with another --out)"
        )


def _run_record(config: TrainConfig, manifest: Manifest, dist: DistInfo) -> dict[str, Any]:
    return {
        "config": config.as_dict(),
        "data_fingerprint": manifest.fingerprint,
        "world_size": dist.world,
        "mrisr_version": __version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
    }


def _provenance_base(
    config: TrainConfig,
    manifest: Manifest,
    dist: DistInfo,
    init: WeightsFile | None,
    payload: dict[str, Any],
) -> dict[str, Any]:
    init_info = None
    if init is not None:
        init_info = {"path": str(init.path), "sha256": init.sha256}
    elif payload.get("init_sha256"):  # resumed without the file: the path it started from
        started = json.loads(payload["config"]).get("init")
        init_info = {"path": started, "sha256": payload["init_sha256"]}
    return {
        "stage": config.stage,
        "data_dir": str(Path(config.data).resolve()),
        "data_manifest_sha256": manifest.sha256,
        "data_fingerprint": manifest.fingerprint,
        "git_commit": git_commit(),
        "init": init_info,
        "world_size": dist.world,
        "global_batch": config.batch_size * dist.world,
        "torch_version": torch.__version__,
        "config": config.as_dict(),
    }


def fixed_batch_l1(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor) -> float:
    """L1 of a model on one batch, in training mode (batch statistics) without changing it."""
    import copy

    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        return float(l1_loss(probe(lr), hr))
