"""RRDG: the residual-in-residual dense block generator of Wang et al. (2020), in 3D.

Layout (the authors' released code, which gives the paper's 2,650,129 parameters exactly):
``conv 1->nf`` | ``n_blocks x RRDB`` + ``trunk conv + BN`` inside a global (feature) residual |
``conv nf->nf + LeakyReLU`` | ``conv nf->1``. Each RRDB chains three dense blocks of five 3x3x3
convolutions (growth ``k``), each conv followed by BatchNorm (and LeakyReLU(0.2) except the
fifth); dense blocks and RRDBs add their output scaled by ``residual_scale`` (0.2).

Gradient checkpointing (Pleiss et al. 2017) recomputes each concatenation and the convolution
that reads it in the backward pass instead of storing the wide concatenated tensor; the
BatchNorm stays outside the checkpoint so its running statistics are updated once per step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _conv3(in_channels: int, out_channels: int) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)


class _ConcatConv(nn.Module):
    """Concatenate the dense inputs and convolve them (the part worth checkpointing)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _conv3(in_channels, out_channels)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat(features, dim=1))


class DenseBlock(nn.Module):
    """Five densely connected conv-BN(-LeakyReLU) units with a scaled residual."""

    def __init__(self, *, features: int, growth: int, residual_scale: float) -> None:
        super().__init__()
        self.residual_scale = residual_scale
        self.checkpointing = False
        widths = [features + i * growth for i in range(5)]
        outs = [growth] * 4 + [features]
        self.convs = nn.ModuleList(_ConcatConv(w, o) for w, o in zip(widths, outs, strict=True))
        self.norms = nn.ModuleList(nn.BatchNorm3d(o) for o in outs)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense: list[torch.Tensor] = [x]
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            if self.checkpointing and self.training and torch.is_grad_enabled():
                out = checkpoint(conv, *dense, use_reentrant=False)
            else:
                out = conv(*dense)
            out = norm(out)
            if i < 4:
                out = self.act(out)
                dense.append(out)
        return x + self.residual_scale * out


class RRDB(nn.Module):
    """Three dense blocks inside one more scaled residual."""

    def __init__(self, *, features: int, growth: int, residual_scale: float) -> None:
        super().__init__()
        self.residual_scale = residual_scale
        self.dense_blocks = nn.Sequential(
            *(
                DenseBlock(features=features, growth=growth, residual_scale=residual_scale)
                for _ in range(3)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual_scale * self.dense_blocks(x)


class RRDG(nn.Module):
    """3D RRDB generator; maps a 1-channel patch to a 1-channel patch of the same size."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        features: int = 48,
        blocks: int = 4,
        growth: int = 12,
        residual_scale: float = 0.2,
    ) -> None:
        super().__init__()
        self.conv_first = _conv3(in_channels, features)
        self.rrdbs = nn.Sequential(
            *(
                RRDB(features=features, growth=growth, residual_scale=residual_scale)
                for _ in range(blocks)
            )
        )
        self.trunk_conv = _conv3(features, features)
        self.trunk_norm = nn.BatchNorm3d(features)
        self.conv_hr = _conv3(features, features)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.conv_last = _conv3(features, in_channels)

    def set_checkpointing(self, enabled: bool) -> None:
        """Switch gradient checkpointing of the dense accumulation (training only)."""
        for module in self.modules():
            if isinstance(module, DenseBlock):
                module.checkpointing = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv_first(x)
        trunk = self.trunk_norm(self.trunk_conv(self.rrdbs(features)))
        return self.conv_last(self.act(self.conv_hr(features + trunk)))
