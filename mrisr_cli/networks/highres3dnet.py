"""HighRes3DNet (Li et al. 2017, IPMI): the brain parcellation network behind the M_h metric.

Layout (in the order of the pretrained state dict's ``block.N`` keys, the layout of the
``highresnet`` package, so the converted NiftyNet weights load with ``strict=True``):

0. 3x3x3 conv 1 -> 16, BatchNorm, ReLU
1. 3 residual blocks, dilation 1, 16 channels
2. 3 residual blocks, dilation 2, 32 channels (the first pads its 16 input channels with zeros)
3. 3 residual blocks, dilation 4, 64 channels
4. 1x1x1 conv 64 -> 80, BatchNorm, ReLU
5. dropout (identity at evaluation)
6. 1x1x1 conv 80 -> 160 labels, BatchNorm (logits)

Each residual block is two pre-activation units (BatchNorm, ReLU, zero pad, dilated 3x3x3 conv
without bias) plus the identity. The 6 feature maps of Wang et al. 2020 (Sec. 2.4: "a primary
convolution, 3 residual blocks, and 2 final convolutions") are the outputs of blocks 0, 1, 2, 3,
4 and 6. The network is not in the generator registry: it is only ever loaded from a user's file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mrisr_cli.errors import WeightsError

NUM_LABELS = 160
FEATURE_BLOCKS = (0, 1, 2, 3, 4, 6)
RECEPTIVE_RADIUS = 43  # (3 - 1)/2 + sum over dilations d of 3 blocks x 2 convs x d = 1 + 42


class ConvUnit(nn.Module):
    """Conv (+ BatchNorm, ReLU); ``preactivation`` puts BatchNorm and ReLU first (residual units).

    Submodule indices inside ``convolutional_block`` match the pretrained keys: pre-activation
    units are [BN, ReLU, pad, conv]; the first layer is [pad, conv, BN, ReLU]; 1x1x1 layers are
    [conv, BN(, ReLU)].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        dilation: int = 1,
        preactivation: bool = True,
        activation: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if preactivation:
            layers += [nn.BatchNorm3d(in_channels), nn.ReLU()]
        if kernel_size > 1:
            layers.append(nn.ZeroPad3d(dilation * (kernel_size // 2)))
        layers.append(
            nn.Conv3d(in_channels, out_channels, kernel_size, dilation=dilation, bias=False)
        )
        if not preactivation:
            layers.append(nn.BatchNorm3d(out_channels))
            if activation:
                layers.append(nn.ReLU())
        self.convolutional_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolutional_block(x)


class ResidualUnit(nn.Module):
    """Two dilated pre-activation convs plus the identity (zero-padded when channels grow)."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.residual_block = nn.Sequential(
            ConvUnit(in_channels, out_channels, dilation=dilation),
            ConvUnit(out_channels, out_channels, dilation=dilation),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_block(x)
        if self.extra_channels:
            half = self.extra_channels // 2
            pad = x.new_zeros(x.shape[0], half, *x.shape[2:])
            x = torch.cat((pad, x, pad), dim=1)
        return out + x


class DilationStage(nn.Module):
    """Three residual units sharing one dilation factor."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int) -> None:
        super().__init__()
        units = [ResidualUnit(in_channels, out_channels, dilation=dilation)]
        units += [ResidualUnit(out_channels, out_channels, dilation=dilation) for _ in range(2)]
        self.dilation_block = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dilation_block(x)


class HighRes3DNet(nn.Module):
    """1-channel T1 volume -> logits over 160 GIF labels, with the 6 feature maps of M_h."""

    def __init__(self, *, in_channels: int = 1, num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.block = nn.Sequential(
            ConvUnit(in_channels, 16, preactivation=False),
            DilationStage(16, 16, dilation=1),
            DilationStage(16, 32, dilation=2),
            DilationStage(32, 64, dilation=4),
            ConvUnit(64, 80, kernel_size=1, preactivation=False),
            nn.Dropout3d(),
            ConvUnit(80, num_labels, kernel_size=1, preactivation=False, activation=False),
        )

    def iter_features(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the 6 feature maps one by one (the last one is the logits).

        A generator, so a caller can reduce each map and let it be freed before the next one:
        the whole set for a 128^3 window would not fit in a laptop's memory.
        """
        for index, layer in enumerate(self.block):
            x = layer(x)
            if index in FEATURE_BLOCKS:
                yield x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = list(self.iter_features(x))
        return features[-1], features


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a weights-only PyTorch pickle; never arbitrary code."""
    with path.open("rb") as handle:
        head = handle.read(8)
    is_pickle_or_zip = head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    if path.suffix == ".safetensors" or not is_pickle_or_zip:
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception as exc:
            if path.suffix == ".safetensors":
                raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
            raise WeightsError(
                f"{path}: neither a safetensors file nor a PyTorch state dict"
            ) from exc
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: not loadable as a weights-only PyTorch state dict ({first})"
        ) from exc
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return dict(loaded)


def load_highres3dnet(path: Path) -> HighRes3DNet:
    """Build HighRes3DNet and load a converted pretrained state dict strictly, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: parcellation weights file not found")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a parcellation weights file")
    state = _read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = HighRes3DNet()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"{len(missing)} missing keys (e.g. {missing[:1]})" if missing else ""
        if unexpected:
            detail += ", " if detail else ""
            detail += f"{len(unexpected)} unexpected keys (e.g. {unexpected[:1]})"
        raise WeightsError(f"{path}: not HighRes3DNet weights in the highresnet layout ({detail})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"HighRes3DNet expects {tuple(expected[key].shape)}"
            )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover - keys and shapes were checked above
        raise WeightsError(f"{path}: could not load HighRes3DNet weights ({exc})") from exc
    return model.eval()
