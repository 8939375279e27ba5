"""Network registry: a plain dict from name to builder, so a weights file rebuilds its network.

A :class:`NetworkConfig` (name + keyword hyper-parameters) is stored in every weights file;
:func:`build_network` turns it back into a module. No import magic: each module registers its
builders in ``BUILDERS`` below.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mrisr_cli.errors import WeightsError
from mrisr_cli.networks.discriminator import PatchDiscriminator
from mrisr_cli.networks.fsrcnn import FSRCNN3D
from mrisr_cli.networks.mdcsrn import MDCSRN
from mrisr_cli.networks.rrdg import RRDG
from mrisr_cli.networks.srresnet import SRResNet3D

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "rrdg": RRDG,
    "fsrcnn": FSRCNN3D,
    "srresnet": SRResNet3D,
    "mdcsrn": MDCSRN,
    "patch_discriminator": PatchDiscriminator,
}

GENERATORS: tuple[str, ...] = ("rrdg", "fsrcnn", "srresnet", "mdcsrn")

#: layer counts whose 0 builds a working (if shallow) network, which the tests' fastest
#: networks use; every other int hyper-parameter is a size, at least 1
COUNTS_THAT_MAY_BE_ZERO: dict[str, frozenset[str]] = {
    "rrdg": frozenset({"blocks"}),
    "srresnet": frozenset({"blocks"}),
    "fsrcnn": frozenset({"m"}),
    "patch_discriminator": frozenset({"plain_layers"}),
}


@dataclass(frozen=True)
class NetworkConfig:
    """What rebuilds a network: its registry name and keyword hyper-parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "params": self.params}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NetworkConfig:
        try:
            raw = json.loads(text)
            return cls(name=str(raw["name"]), params=dict(raw.get("params", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"network configuration is not readable: {exc}") from exc


def build_network(config: NetworkConfig) -> nn.Module:
    """Instantiate the network a config describes; unknown names are a WeightsError."""
    try:
        builder = BUILDERS[config.name]
    except KeyError:
        known = ", ".join(sorted(BUILDERS))
        raise WeightsError(f"unknown network {config.name!r} (known: {known})") from None
    problem = _bad_param(config.name, builder, config.params)
    if problem:
        raise WeightsError(f"bad hyper-parameters for network {config.name!r}: {problem}")
    try:
        return builder(**config.params)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: e.g. a negative size
        raise WeightsError(f"bad hyper-parameters for network {config.name!r}: {exc}") from exc


def _bad_param(
    name_of_network: str, builder: Callable[..., nn.Module], params: dict[str, Any]
) -> str | None:
    """What is wrong with a value the builder declares as int or float (None: nothing), found
    before building: torch takes a size of 0 with a multi-line warning, -1 blocks as none, and
    "x" as a format error."""
    declared = inspect.signature(builder).parameters
    for name, value in params.items():
        kind = declared[name].annotation if name in declared else None
        least = 0 if name in COUNTS_THAT_MAY_BE_ZERO.get(name_of_network, ()) else 1
        if kind == "int" and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            return f"{name} must be a whole number of at least {least} (got {value!r})"
        if kind == "float" and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return f"{name} must be a finite number (got {value!r})"
    return None


def count_parameters(module: nn.Module) -> int:
    """Learnable parameters (weights, biases, norm affines), the paper's #param."""
    return sum(p.numel() for p in module.parameters())
