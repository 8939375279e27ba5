"""3D FSRCNN (Dong et al. 2016) on the same grid: the paper's smallest baseline.

Layout: ``5^3 conv 1->d`` (feature extraction) | ``1^3 conv d->s`` (shrinking) |
``m x 3^3 conv s->s`` (mapping) | ``1^3 conv s->d`` (expanding) | ``9^3 conv d->1`` (the
deconvolution of FSRCNN becomes a stride-1 convolution, since input and output share a grid).
With ``d=56, s=12, m=4`` the convolutions alone hold 64,893 parameters, the paper's count exactly,
so the activations must have none: FSRCNN's PReLU is replaced by LeakyReLU(0.25), a PReLU frozen
at its initial slope. Every convolution but the last is followed by it.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def _act() -> nn.LeakyReLU:
    """PReLU's initial slope (0.25), without its learnable parameter."""
    return nn.LeakyReLU(0.25, inplace=True)


class FSRCNN3D(nn.Module):
    """3D FSRCNN; maps a 1-channel patch to a 1-channel patch of the same size."""

    def __init__(self, *, in_channels: int = 1, d: int = 56, s: int = 12, m: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(in_channels, d, 5), _act(), _conv(d, s, 1), _act()]
        for _ in range(m):
            layers += [_conv(s, s, 3), _act()]
        layers += [_conv(s, d, 1), _act()]
        self.body = nn.Sequential(*layers)
        self.conv_last = _conv(d, in_channels, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.body(x))
