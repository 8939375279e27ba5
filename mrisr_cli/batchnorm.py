"""BatchNorm population statistics recomputed with the final weights ("precise BN").

During training a BatchNorm layer keeps running averages of its batch statistics (momentum 0.1):
they mix statistics of weights from the last ~10 steps. When the weights still move fast (short
schedules, high learning rates) those averages lag behind, and the network in eval mode, which is
how `upsample` runs it, shifts its outputs: the first released RRDG (224 steps, 2026-11-27) added a
bias of about 0.13 standard deviations to every background voxel. Recomputing each layer's mean and
variance over a fixed set of training patches with the weights as they are (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021) removes the lag. It changes only BatchNorm buffers,
never a learned weight. Training does it before each validation (``TrainConfig.precise_bn``);
:func:`recalibrate_weights_file` does it to a weights file that was trained without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from mrisr_cli.patches import PatchSampler
from mrisr_cli.weights import WeightsFile, save_weights

#: First element of the recalibration batches' keys in the counter-based sampler: training keys
#: are (step, sub-step), and no run reaches this step, so these patches are never a training draw.
RECALIBRATION_KEY = 2**32 - 1


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running mean and variance by the average of its batch
    statistics over ``batches`` (inputs already on the model's device); returns the number of
    batches seen. Only BatchNorm layers switch to training mode; the model's modes and momenta
    are restored afterwards."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [layer.momentum for layer in layers]
    seen = 0
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the batches
            layer.train()
        for batch in batches:
            model(batch)
            seen += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise ValueError("no batches to recompute the BatchNorm statistics from")
    return seen


def sampler_batches(
    sampler: PatchSampler, patches: int, batch_size: int, device: str | torch.device
) -> Iterable[torch.Tensor]:
    """The LR inputs of ``patches`` training patches (rounded up to whole batches), always the
    same ones for a given sampler seed."""
    for k in range(math.ceil(patches / batch_size)):
        lr, _ = sampler.batch((RECALIBRATION_KEY, k), batch_size)
        yield torch.from_numpy(lr).to(device)


def recalibrate_weights_file(
    weights: WeightsFile,
    sampler: PatchSampler,
    output: Path,
    *,
    patches: int = 64,
    batch_size: int = 4,
    device: str = "cpu",
    overwrite: bool = False,
) -> int:
    """Write ``weights`` to ``output`` with recomputed BatchNorm statistics; the provenance
    records the recalibration and the file it came from. Returns the batches used."""
    model = weights.build().to(device)
    seen = recalibrate_batchnorm(model, sampler_batches(sampler, patches, batch_size, device))
    provenance = dict(weights.provenance)
    provenance["precise_bn"] = {
        "patches": seen * batch_size,
        "batch_size": batch_size,
        "seed": sampler.seed,
        "subjects": [s.id for s in sampler.subjects],
        "source_sha256": weights.sha256,
    }
    save_weights(
        output,
        model.state_dict(),
        weights.network,
        weights.degradation,
        provenance=provenance,
        overwrite=overwrite,
    )
    return seen
