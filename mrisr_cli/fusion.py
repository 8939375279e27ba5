"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is a fixed affine map per channel, so when it reads nothing but one
convolution's output it can be absorbed into that convolution's weights and bias: the same result
up to rounding, one pass over the activations less per pair (61 pairs in the paper's RRDG).

Pairs are found from the real data flow (a torch.fx trace of the forward, or the same pairs read
off the known structure of mrisr's generators, below), not from module order:
RRDG keeps its convolutions and norms in two parallel lists, and a BatchNorm placed before a
convolution (mDCSRN's BN-ELU-conv units) or fed by anything else is left as it is. The model given
is never modified: the folded network is a copy, for inference only.

Tracing is process-global: while ``torch.fx.symbolic_trace`` runs it patches ``nn.Module.__call__``
for every module of the process, so a forward pass in another thread at that moment is traced
too and fails. mrisr's four generators therefore are never traced: their pairs are read off
their (known) structure, the same pairs the trace gives (a test checks). Other networks are
traced under a lock, so that two traces never overlap; a torch model that another thread runs
during such a trace is still exposed.
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from mrisr_cli.networks import fsrcnn, mdcsrn, rrdg, srresnet

_TRACE_LOCK = threading.Lock()

#: Module types whose forwards the structural pairs below are read from: a generator built only
#: of these (the registry's networks as built) runs exactly the data flow of those forwards.
_KNOWN_PARTS: frozenset[type] = frozenset(
    {
        nn.Sequential,
        nn.ModuleList,
        nn.Conv3d,
        nn.BatchNorm3d,
        nn.LeakyReLU,
        nn.PReLU,
        nn.ELU,
        rrdg.RRDG,
        rrdg.RRDB,
        rrdg.DenseBlock,
        rrdg._ConcatConv,
        srresnet.SRResNet3D,
        srresnet.ResidualBlock,
        fsrcnn.FSRCNN3D,
        mdcsrn.MDCSRN,
        mdcsrn.DenseBlock,
        mdcsrn.DenseUnit,
    }
)


def _structural_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """The candidate pairs of one of mrisr's generators, in forward order, without tracing;
    None for any other module (or one holding parts of another type): it is traced instead.

    RRDG: each dense block's ``convs.i.conv -> norms.i`` and ``trunk_conv -> trunk_norm``;
    SRResNet: each residual block's ``body.0 -> body.1`` and ``body.3 -> body.4``, and the trunk;
    FSRCNN has no BatchNorm; mDCSRN's BatchNorms read concatenations (BN-ELU-conv), not convs.
    """
    if any(type(m) not in _KNOWN_PARTS or "forward" in vars(m) for m in model.modules()):
        return None  # another part, or a forward replaced on the instance
    kind = type(model)
    if kind in (fsrcnn.FSRCNN3D, mdcsrn.MDCSRN):
        return []
    pairs: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if type(module) is rrdg.DenseBlock:
            if module.checkpointing and module.training:  # convs called through checkpoint()
                return None
            n = len(module.norms)
            pairs += [(f"{name}.convs.{i}.conv", f"{name}.norms.{i}") for i in range(n)]
        elif type(module) is srresnet.ResidualBlock:
            pairs += [(f"{name}.body.0", f"{name}.body.1"), (f"{name}.body.3", f"{name}.body.4")]
    if kind in (rrdg.RRDG, srresnet.SRResNet3D):
        return [*pairs, ("trunk_conv", "trunk_norm")]
    return None  # a part (a bare dense block, say) given on its own: traced


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` can be absorbed into ``conv`` (data flow aside)."""
    return (
        isinstance(conv, _ConvNd)
        and isinstance(bn, _BatchNorm)
        and not conv.transposed
        and conv.out_channels == bn.num_features
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for each BatchNorm whose only input is a conv used only by it.

    mrisr's generators are not traced (see the module's docstring); any other network is,
    under a lock. A network that torch.fx cannot trace gives no pairs (it is then run unfolded).
    """
    known = _structural_pairs(model)
    if known is not None:
        modules = dict(model.named_modules())
        return [(c, b) for c, b in known if _foldable(modules[c], modules[b])]
    return traced_conv_bn_pairs(model)


def traced_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """:func:`conv_bn_pairs` from a torch.fx trace of the forward (one trace at a time)."""
    try:
        with _TRACE_LOCK:
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
        foldable = (
            _foldable(modules[source.target], bn)
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
