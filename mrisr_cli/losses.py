"""The training losses (SPEC "Losses and training"; the critic scores how *fake* a patch looks).

``L_G = L1(sr, hr) + lambda_adv * mean D(sr)`` and
``L_D = mean D(hr) - mean D(sr) + lambda_gp * mean (||grad D(x_hat)||_2 - 1)^2`` with
``x_hat = gamma * sr + (1 - gamma) * hr``, ``gamma ~ U(0, 1)`` per sample, shape (B, 1, 1, 1, 1).
The interpolation weights are a function of the step, so a resumed run draws the same ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def fixed_batch_l1(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor) -> float:
    """L1 of a model on one batch, in training mode (batch statistics) without changing it."""
    import copy

    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        return float(l1_loss(probe(lr), hr))
