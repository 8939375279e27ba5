"""3D SRResNet (Ledig et al. 2017) on the same grid: the paper's residual baseline.

Layout: ``9^3 conv 1->nf + PReLU`` | ``blocks x (conv-BN-PReLU-conv-BN + skip)`` | ``conv-BN``
inside a global residual | ``9^3 conv nf->1``. The pixel-shuffle up-sampling stage is dropped:
input and output share a grid. Ledig's width (64), outer kernels (9), BatchNorm and PReLU
(channel-wise, He et al.'s form) are kept; the paper gives nothing more, so the rest was searched
(width 32-128, 1-32 blocks, outer kernels 3-9, PReLU shared/channel-wise/none, same-grid
convolutions in place of the up-sampling stage). With Ledig's choices 8 blocks fit best:
1,977,281 parameters, 1.4% under the paper's 2,004,620 (7 blocks: 12% under, 9: 10% over).
Closer counts exist (48 features, 15 blocks: 2,003,713) but only by leaving Ledig's layout.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class ResidualBlock(nn.Module):
    """conv-BN-PReLU-conv-BN with an identity skip."""

    def __init__(self, *, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(features, features),
            nn.BatchNorm3d(features),
            nn.PReLU(features),
            _conv(features, features),
            nn.BatchNorm3d(features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet3D(nn.Module):
    """3D SRResNet; maps a 1-channel patch to a 1-channel patch of the same size."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        features: int = 64,
        blocks: int = 8,
        outer_kernel: int = 9,
    ) -> None:
        super().__init__()
        self.conv_first = _conv(in_channels, features, outer_kernel)
        self.act = nn.PReLU(features)
        self.blocks = nn.Sequential(*(ResidualBlock(features=features) for _ in range(blocks)))
        self.trunk_conv = _conv(features, features)
        self.trunk_norm = nn.BatchNorm3d(features)
        self.conv_last = _conv(features, in_channels, outer_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.act(self.conv_first(x))
        trunk = self.trunk_norm(self.trunk_conv(self.blocks(features)))
        return self.conv_last(features + trunk)
