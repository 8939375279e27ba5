"""The checks before a training run writes anything: its data, its starting weights and, for
``--resume``, that the settings still compute the run that was started.

A refused start costs a line on the terminal; an unchecked one costs hours of GPU time, or
weights whose provenance records other data or settings than they were trained with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.distributed import DistInfo
from mrisr_cli.errors import InputError, OutputError, WeightsError
from mrisr_cli.manifest import MANIFEST_NAME, Manifest, load_manifest
from mrisr_cli.run_files import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CRITIC_NAME,
    LAST_NAME,
    read_checkpoint,
)
from mrisr_cli.training_config import (
    CRITIC_LR_PER_LR,
    GAN_ONLY,
    OPTION_NAMES,
    RESUME_MAY_CHANGE,
    TrainConfig,
)
from mrisr_cli.weights import WeightsFile, load_weights


@dataclass
class RunInputs:
    """What a training call reads before it writes anything."""

    manifest: Manifest
    payload: dict[str, Any]  # the checkpoint; {} for a new run
    init: WeightsFile | None  # --init
    critic_init: WeightsFile | None  # --init-critic (never on --resume: the checkpoint holds it)


def read_inputs(
    config: TrainConfig, dist: DistInfo, *, resume: bool, warn: Callable[[str], None]
) -> RunInputs:
    """The data, the checkpoint and the --init (and --init-critic) weights, checked against
    each other and against the run folder before anything is written."""
    out = Path(config.out)
    manifest = _load_data(Path(config.data))
    _refuse_out_in_data(out, Path(config.data), resume, warn)
    payload: dict[str, Any] = {}
    if resume:
        payload = _read_run_checkpoint(out)
    elif (out / CHECKPOINT_NAME).exists():
        raise OutputError(
            f"{out}: already holds a training run; continue it with --resume or choose "
            "another --out"
        )
    else:
        _refuse_trained_weights(out)
    init = _load_init(config, manifest, resume, payload, warn)
    if resume:
        _check_resume(payload, config, manifest, init, dist, _resume_critic(config, warn))
        _check_schedule(payload, config)
    critic_init = None if resume else _load_critic_init(config, manifest, init, warn)
    return RunInputs(manifest, payload, init, critic_init)


def _load_data(path: Path) -> Manifest:
    """The data folder's manifest; a manifest named instead of its folder gets a hint."""
    if path.is_file():
        if path.name == MANIFEST_NAME:
            raise InputError(
                f"{path}: is the manifest; give --data the folder that holds it ({path.parent})"
            )
        raise InputError(f"{path}: is a file; give --data the folder made by `mrisr prepare`")
    return load_manifest(path)


def _refuse_out_in_data(out: Path, data: Path, resume: bool, warn: Callable[[str], None]) -> None:
    """A run folder inside the prepared dataset (or the dataset itself) mixes checkpoints and
    weights into a folder that is copied, shared and prepared again as data. Compared with
    symlinks resolved: a link to the dataset is the dataset. A run started there by an earlier
    version is warned about on --resume, not stopped (a SLURM chain of resumes goes on)."""
    real_out, real_data = out.resolve(), data.resolve()
    if real_out != real_data and not real_out.is_relative_to(real_data):
        return
    where = "is the same folder as" if real_out == real_data else "is inside"
    name = "run1" if real_out == real_data else real_out.relative_to(real_data).parts[0]
    beside = real_data.parent / "runs" / name
    if resume:
        warn(
            f"--out {out} {where} --data {data}: training files are mixed into the prepared "
            f"dataset; move the run to a folder beside the data, such as {beside}, and resume "
            "there"
        )
        return
    raise OutputError(
        f"--out {out} {where} --data {data}: training files would be mixed into the prepared "
        f"dataset; choose a folder beside the data, such as --out {beside}"
    )


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


def load_init_weights(
    path: Path,
    *,
    expect_network: str | None = None,
    names: tuple[str, ...] | None = None,
) -> WeightsFile:
    """:func:`load_weights`, pointing from a run's checkpoint (a pickle) to its weights files
    (``names``; default: the generator's, best and last; the critic's is :data:`CRITIC_NAME`)."""
    path = Path(path)
    if path.name == CHECKPOINT_NAME and path.is_file():
        files = " or ".join(str(path.parent / n) for n in names or (BEST_NAME, LAST_NAME))
        raise WeightsError(f"{path}: is a training checkpoint, not weights; give {files}")
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
    continuing = config.stage == "gan" and config.critic_init is not None  # with its critic
    if not resume and recorded == "gan" and not continuing:
        hint = (
            "the GAN stage usually starts from PSNR weights (PSNR_RUN/best.safetensors)"
            if config.stage == "gan"
            else "--stage psnr trains them on with the L1 loss alone"
        )
        warn(
            f"--init {path}: holds GAN-stage weights (their provenance records stage 'gan'); {hint}"
        )
    return init


def _load_critic_init(
    config: TrainConfig,
    manifest: Manifest,
    init: WeightsFile | None,
    warn: Callable[[str], None],
) -> WeightsFile | None:
    """The --init-critic weights: a GAN run's critic file, the same critic (name and
    --critic-params), trained on data prepared the same way as --data; one that seems to come
    from another run than the --init generator is warned about (it may be deliberate)."""
    if config.critic_init is None:
        return None
    path = Path(config.critic_init)
    critic = load_init_weights(path, expect_network=config.critic.name, names=(CRITIC_NAME,))
    if critic.network.params != config.critic.params:
        raise WeightsError(
            f"{path}: critic parameters {critic.network.params} differ from --critic-params "
            f"{config.critic.params}"
        )
    _check_degradation(critic, manifest.degradation)
    reason = _paired_with(critic, init)
    if reason:
        warn(reason)
    return critic


def _resume_critic(config: TrainConfig, warn: Callable[[str], None]) -> WeightsFile | None:
    """--init-critic on --resume: the checkpoint holds the critic, so a file that has moved
    since is only warned about; one that is there must be the run's own (see _check_resume)."""
    if config.critic_init is None:
        return None
    path = Path(config.critic_init)
    if not path.exists():
        warn(
            f"--init-critic {path}: not found; ignored, since {CHECKPOINT_NAME} holds the "
            "run's critic"
        )
        return None
    return load_init_weights(path, expect_network=config.critic.name, names=(CRITIC_NAME,))


def _paired_with(critic: WeightsFile, init: WeightsFile | None) -> str:
    """Why ``critic`` seems not to be the critic of the --init generator ("" when it is, or
    when the files do not say): both files of one GAN export record the same run and step."""
    mine = critic.provenance if isinstance(critic.provenance, dict) else {}
    theirs = init.provenance if init is not None and isinstance(init.provenance, dict) else {}
    if mine.get("role") != "critic" or theirs.get("stage") != "gan":
        return ""
    if (mine.get("step"), mine.get("init")) != (theirs.get("step"), theirs.get("init")):
        return (
            f"--init-critic {critic.path} was saved at step {mine.get('step')} of another run "
            f"than --init {init.path} (step {theirs.get('step')}) came from; each file's "
            "run folder holds both (last.safetensors and critic.safetensors)"
        )
    return ""


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
    _check_degradation(init, degradation)


def _check_degradation(init: WeightsFile, degradation: DegradationConfig) -> None:
    if init.degradation.to_json() != degradation.to_json():
        diff = _differences(
            json.loads(init.degradation.to_json()), json.loads(degradation.to_json()), frozenset()
        )
        raise WeightsError(
            f"{init.path}: was trained on data prepared differently from --data "
            f"({'; '.join(diff).replace('--', '')})"
        )


def _check_resume(
    payload: dict[str, Any],
    config: TrainConfig,
    manifest: Manifest,
    init: WeightsFile | None,
    dist: DistInfo,
    critic: WeightsFile | None = None,
) -> None:
    """Refuse to continue a run with settings that would change what it computes."""
    before, now = json.loads(payload["config"]), config.as_dict()
    may_change = RESUME_MAY_CHANGE
    if config.stage == "psnr":
        may_change |= GAN_ONLY
    elif _critic_lr_follows_lr(before) and _critic_lr_follows_lr(now):
        # derived by the CLI: it changed only if --lr did, which is reported (and refused)
        may_change |= {"critic_lr"}
    diffs = _differences(before, now, may_change)
    global_before = int(before["batch_size"]) * int(payload["world_size"])
    global_now = config.batch_size * dist.world
    if global_before != global_now:
        diffs.append(
            f"the global batch (--batch-size x processes) was {global_before}, now {global_now}"
        )
    if payload["data_fingerprint"] != manifest.fingerprint:
        diffs.append(f"--data {config.data} holds other data than the run was started on")
    diffs += _start_differs("--init", config.init, init, payload.get("init_sha256"))
    started = payload.get("critic_init")
    started_sha = started.get("sha256") if isinstance(started, dict) else None
    diffs += _start_differs("--init-critic", config.critic_init, critic, started_sha)
    if diffs:
        raise InputError(
            f"{config.out}: cannot resume with different settings: {'; '.join(diffs)} "
            "(resume with the original settings, or start a new run with another --out)"
        )


def _start_differs(
    option: str, path: str | None, given: WeightsFile | None, started_sha: str | None
) -> list[str]:
    """A starting file given on --resume must be the one the run started from, if it had one."""
    if given is None:
        return []
    if not started_sha:
        return [f"{option} {path} is given, but the run was started without {option}"]
    if given.sha256 != started_sha:
        return [f"{option} {path} is another file than the run was started from"]
    return []


def _critic_lr_follows_lr(settings: dict[str, Any]) -> bool:
    """Whether the critic's learning rate is the one the CLI derives from --lr."""
    lr = settings.get("lr")
    return isinstance(lr, int | float) and settings.get("critic_lr") == CRITIC_LR_PER_LR * lr


def _differences(before: dict[str, Any], now: dict[str, Any], skip: frozenset[str]) -> list[str]:
    """'--option was X, now Y' for each setting that differs, those in ``skip`` aside."""
    names = []
    for key in sorted(set(before) | set(now)):
        if key in skip or before.get(key) == now.get(key):
            continue
        option = OPTION_NAMES.get(key, "--" + key.replace("_", "-"))
        names.append(f"{option} was {before.get(key)!r}, now {now.get(key)!r}")
    return names
