"""`mrisr selftest`: exercise the installed code end to end without trained weights.

A tiny RRDG with random weights is saved with the real weights I/O, a synthetic head phantom is
degraded with the real k-space procedure and super-resolved through the real pipeline. It proves
the installation (container, cluster module) works; it says nothing about image quality.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.degrade_file import degrade_file
from mrisr_cli.errors import MrisrError
from mrisr_cli.inference import InferenceOptions
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.pipeline import UpsampleOptions, load_generator_files, upsample_file
from mrisr_cli.volumes import load_volume, save_volume

TINY_RRDG = NetworkConfig("rrdg", {"features": 8, "blocks": 1, "growth": 4})


def phantom(shape: tuple[int, int, int] = (40, 36, 44), seed: int = 0) -> np.ndarray:
    """Nested ellipsoids with texture: bright 'white matter' in darker 'grey matter'."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    radius = sum(g**2 for g in grids)
    head = (radius < 0.8).astype(np.float32) * 60
    brain = (radius < 0.55).astype(np.float32) * 40
    texture = rng.normal(0, 5, shape).astype(np.float32) * (radius < 0.8)
    return np.clip(head + brain + texture, 0, None)


def run_selftest(device: str = "cpu") -> str:
    """Degrade and super-resolve a phantom with a tiny random network; return a summary."""
    from mrisr_cli.weights import save_weights

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mrisr-selftest-") as tmp:
        folder = Path(tmp)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        save_volume(folder / "hr.nii.gz", phantom(), affine)
        config = DegradationConfig(n4=False)
        degrade_file(folder / "hr.nii.gz", folder / "lr.nii.gz", config)
        weights = folder / "tiny.safetensors"
        save_weights(weights, build_network(TINY_RRDG).state_dict(), TINY_RRDG, config)
        generator = load_generator_files(weights, None).generator(1.0, device)
        options = UpsampleOptions(inference=InferenceOptions(device=device, batch_size=2))
        result = upsample_file(folder / "lr.nii.gz", folder / "sr.nii.gz", generator, options)
        out = load_volume(folder / "sr.nii.gz")
        if out.data.shape != phantom().shape or not np.allclose(out.affine, affine):
            raise MrisrError("selftest: output geometry differs from the input's")
        return (
            f"{result.output_shape} volume through a tiny random RRDG on {device} "
            f"in {result.seconds['total']:.2f} s"
        )
