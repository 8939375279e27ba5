"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is a fixed affine map per channel, so when it reads nothing but one
convolution's output it can be absorbed into that convolution's weights and bias: the same result
up to rounding, one pass over the activations less per pair (61 pairs in the paper's RRDG).

Pairs are found from the real data flow (a torch.fx trace of the forward), not from module order:
RRDG keeps its convolutions and norms in two parallel lists, and a BatchNorm placed before a
convolution (mDCSRN's BN-ELU-conv units) or fed by anything else is left as it is. The model given
is never modified: the folded network is a copy, for inference only.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for each BatchNorm whose only input is a conv used only by it.

    A network that torch.fx cannot trace gives no pairs (it is then run unfolded).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any untraceable forward: fold nothing rather than guess
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn = modules[node.target]
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv = modules[source.target]
        foldable = (
            isinstance(conv, _ConvNd)
            and not conv.transposed
            and conv.out_channels == bn.num_features
            and bn.running_mean is not None
            and bn.running_var is not None
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        )
        if foldable:
            pairs.append((str(source.target), str(node.target)))
    return pairs


@torch.no_grad()
def _fold_into(conv: _ConvNd, bn: _BatchNorm) -> None:
    """conv <- bn o conv, computed in float64 and stored in the conv's own dtype."""
    dtype = conv.weight.dtype
    var = bn.running_var.double()  # type: ignore[union-attr]
    mean = bn.running_mean.double()  # type: ignore[union-attr]
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    weight = conv.weight.double() * scale.reshape(shape)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype), requires_grad=False)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each conv-fed BatchNorm folded and made an Identity."""
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in conv_bn_pairs(folded):
        _fold_into(folded.get_submodule(conv_name), folded.get_submodule(bn_name))  # type: ignore[arg-type]
        _replace(folded, bn_name, nn.Identity())
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    return folded
