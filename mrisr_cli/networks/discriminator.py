"""Patch discriminator of Wang et al. (2020): a VGG-style critic without dense layers.

Layout (SRGAN's first four layers, then no more striding): ``conv3^3 in->nf`` + LeakyReLU(0.2),
no norm | ``conv nf->nf, stride 2`` | ``conv nf->2nf`` | ``conv 2nf->2nf, stride 2`` | plain
convolutions widening 4nf, 8nf, ... | ``1^3 conv -> 1`` | global spatial mean: one score per sample.
Every convolution after the first and before the last is conv3^3-norm-LeakyReLU(0.2). Only two
down-samplings keep the receptive field local, which is what makes it judge texture.
WGAN-GP penalises per-sample gradients, so the norm is never BatchNorm: InstanceNorm (affine), as
the paper's text says, or a layer norm over channels and space (GroupNorm with one group), as its
Fig. 3 says. A 64x40x64 training patch is scored from 16x10x16 positions; any patch that still
has more than one voxel after the two down-samplings works (16^3 becomes 4^3).
"""

from __future__ import annotations

import torch
from torch import nn

NORMS: tuple[str, ...] = ("instance", "layer")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.GroupNorm(1, channels)


def _block(in_channels: int, out_channels: int, *, stride: int, norm: str) -> nn.Sequential:
    """conv3^3 - norm - LeakyReLU(0.2)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        _norm(norm, out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class PatchDiscriminator(nn.Module):
    """Critic for WGAN-GP; returns one unbounded score per sample, shape ``(B,)``."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        base_features: int = 32,
        plain_layers: int = 2,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {norm!r}")
        nf = base_features
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, nf, kernel_size=3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            _block(nf, nf, stride=2, norm=norm),
            _block(nf, 2 * nf, stride=1, norm=norm),
            _block(2 * nf, 2 * nf, stride=2, norm=norm),
        ]
        width = 2 * nf
        for _ in range(plain_layers):
            layers.append(_block(width, 2 * width, stride=1, norm=norm))
            width *= 2
        layers.append(nn.Conv3d(width, 1, kernel_size=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(1, 2, 3, 4))
