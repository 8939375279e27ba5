"""Weights files: safetensors tensors plus metadata that fully describe the model.

The metadata carry the network config (so the file rebuilds its own network), the degradation
settings (so a model is only applied to data prepared the same way) and free-form provenance.
Pickles are never opened: a file that looks like one is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from mrisr_cli import __version__
from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.errors import WeightsError
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.volumes import atomic_path

FORMAT_NAME = "mrisr-weights"
FORMAT_VERSION = "1"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass
class WeightsFile:
    """A loaded weights file: the tensors and what they describe."""

    state: dict[str, torch.Tensor]
    network: NetworkConfig
    degradation: DegradationConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""

    def build(self) -> nn.Module:
        """The network with these weights loaded (strictly), in eval mode on the CPU.

        The network is first built on the meta device (shapes, no memory) and compared with the
        file's tensors, so metadata that ask for a huge network cannot allocate it before the
        mismatch is found. The random initialisation that loading overwrites draws from a fork
        of torch's CPU generator: the caller's random stream is as it was (a seeded run after
        loading a model draws what it would have drawn without).
        """
        try:
            with torch.device("meta"):
                skeleton = build_network(self.network)
        except WeightsError as exc:  # an unknown network name, impossible settings
            raise WeightsError(f"{self.path}: {exc}") from exc
        problem = _mismatch(skeleton.state_dict(), self.state)
        if not problem:
            with torch.random.fork_rng(devices=[]):
                model = build_network(self.network)
            try:
                model.load_state_dict(self.state, strict=True)
                return model.eval()
            except RuntimeError:  # names and shapes fit, yet a tensor does not load
                problem = "the tensors do not load"
        raise WeightsError(
            f"{self.path}: tensors do not fit network {self.network.name!r} ({problem})"
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(
    path: Path,
    state: dict[str, torch.Tensor],
    network: NetworkConfig,
    degradation: DegradationConfig,
    *,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write tensors (made contiguous, on CPU) and metadata atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "network": network.to_json(),
        "degradation": degradation.to_json(),
        "mrisr_version": __version__,
        "provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
    }
    with atomic_path(Path(path), overwrite=overwrite) as tmp:
        tmp.write_bytes(_metadata_sorted(save(tensors, metadata=metadata)))


def _metadata_sorted(blob: bytes) -> bytes:
    """The same safetensors file with its metadata keys in sorted order.

    safetensors writes them in a hash map's order, which changes from one save to the next, so
    two saves of the same tensors and metadata (``best`` and ``last`` of one step) differed in
    their bytes, and so in the sha256 by which a GAN model names the PSNR model it was tuned
    from. Sorted, a file's bytes follow from its content alone.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stay 8-byte aligned, as safetensors keeps them
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def provenance_of(metadata: dict[str, str]) -> Any:
    """A file's free-form provenance (run, step, init...), ``{}`` where it holds none that
    parses: it describes a file, it never decides whether the file loads."""
    try:
        return json.loads(metadata.get("provenance", "{}"))
    except ValueError:
        return {}


def _mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between a network's tensors and a file's, named, in a few words ("" when
    the names and shapes agree)."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape, e.g. {k} {tuple(found[k].shape)} "
            f"instead of {tuple(expected[k].shape)}"
        )
    return "; ".join(parts)


def load_weights(path: Path, *, expect_network: str | None = None) -> WeightsFile:
    """Read and check a weights file; every failure is one WeightsError line."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; name a .safetensors file in it")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    with path.open("rb") as handle:
        head = handle.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise WeightsError(
            f"{path}: is a PyTorch pickle; mrisr only reads .safetensors weights "
            "(pickles can run code when opened)"
        )
    try:
        metadata = read_metadata(path)
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{path}: not a readable safetensors file (truncated or corrupt?)"
        ) from exc
    if metadata.get("format") != FORMAT_NAME:
        raise WeightsError(f"{path}: safetensors file without mrisr metadata (not mrisr weights)")
    try:
        network = NetworkConfig.from_json(metadata.get("network", ""))
        degradation = DegradationConfig.from_json(metadata.get("degradation", ""))
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    if expect_network is not None and network.name != expect_network:
        raise WeightsError(f"{path}: holds a {network.name!r} network, expected {expect_network!r}")
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise WeightsError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values ({bad[0]})")
    return WeightsFile(
        state=state,
        network=network,
        degradation=degradation,
        provenance=provenance_of(metadata),
        path=path,
        sha256=sha256_of(path),
    )
