"""The settings of a training run (:class:`TrainConfig`), checked when they are made.

Every setting is stored in the run's checkpoint and in the provenance of its weights; the
constants below say which of them a ``--resume`` may change and how the CLI names them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mrisr_cli.errors import InputError
from mrisr_cli.networks import GENERATORS, NetworkConfig
from mrisr_cli.tiling import PAPER_MARGIN, PAPER_PATCH

STAGES: tuple[str, ...] = ("psnr", "gan")

#: Settings that may change when a run is resumed: they do not change what is computed.
RESUME_MAY_CHANGE = frozenset(
    {
        "data",
        "out",
        "init",
        "critic_init",  # the checkpoint holds the critic on --resume
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

#: The CLI's --critic-lr when none is given: this times --lr (the authors' ratio).
CRITIC_LR_PER_LR = 5
#: The largest learning rate accepted (the paper's is 1e-4; Adam's steps scale with it).
MAX_LR = 1.0

OPTION_NAMES = {
    "network": "--net/--net-params",
    "critic": "--critic-params",
    "critic_init": "--init-critic",
    "flip_axes": "--flips",
}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (stored in its checkpoint and weights provenance)."""

    stage: str
    data: str
    out: str
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig("rrdg"))
    critic: NetworkConfig = field(default_factory=lambda: NetworkConfig("patch_discriminator"))
    init: str | None = None
    critic_init: str | None = None  # gan: the critic's starting weights (a run's critic file)
    epochs: int = 100
    steps_per_epoch: int = 1000
    batch_size: int = 4  # per process
    lr: float = 1e-4
    critic_lr: float = CRITIC_LR_PER_LR * 1e-4  # what `mrisr train` derives from the default lr
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
        # written so that NaN fails too (every comparison with NaN is false); above MAX_LR Adam
        # diverges at once, and near float32's limit its update overflowed (an internal error)
        # (the critic's limit leaves room for the --critic-lr the CLI derives from --lr)
        for name, limit in (("lr", MAX_LR), ("critic_lr", CRITIC_LR_PER_LR * MAX_LR)):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= limit):
                option = name.replace("_", "-")
                raise InputError(
                    f"--{option} must be a positive number at most {limit:g}, got {value}"
                )
        for name in ("lambda_adv", "lambda_gp"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                option = name.replace("_", "-")
                raise InputError(f"--{option} must be a number >= 0, got {value}")
        if self.critic_init is not None and self.stage != "gan":
            raise InputError("--init-critic is for --stage gan (the PSNR stage has no critic)")
        if self.critic_warmup < 0:
            raise InputError("--critic-warmup cannot be negative")
        if self.time_limit < 0:
            raise InputError("--time-limit cannot be negative")
        if any(p < 8 for p in self.patch):
            raise InputError(f"--patch {self.patch} is too small (at least 8 voxels per axis)")
        # checked here, not by the first validation: that comes after the run folder is made
        if any(p <= 2 * PAPER_MARGIN for p in self.val_patch):
            raise InputError(
                f"--val-patch {','.join(map(str, self.val_patch))} leaves no core after "
                f"cropping the margin of {PAPER_MARGIN} voxels per face (at least "
                f"{2 * PAPER_MARGIN + 1} voxels per axis)"
            )
        if self.val_batch_size < 1:
            raise InputError("the validation batch size must be at least 1")
        if not 0 <= self.seed < 2**64:  # what numpy's and torch's generators take
            raise InputError(f"--seed must be a whole number from 0 to 2**64-1, got {self.seed}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists) for the checkpoint, run.json and provenance."""
        raw = asdict(self)
        raw["network"] = {"name": self.network.name, "params": self.network.params}
        raw["critic"] = {"name": self.critic.name, "params": self.critic.params}
        return json.loads(json.dumps(raw))
