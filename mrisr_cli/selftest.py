"""`mrisr selftest`: exercise the installed code end to end, fast.

A synthetic head phantom is N4-corrected (ANTsPy), degraded with the real k-space procedure and
super-resolved through the real pipeline by a tiny RRDG with random weights, saved with the real
weights I/O. Then the installed trained weights, if any, are loaded and blended once, so
that a missing ANTsPy or a broken weights file shows here and not in a user's first job. It proves
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
from mrisr_cli.n4 import n4_correct
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.pipeline import (
    DEFAULT_PSNR_NAME,
    UpsampleOptions,
    default_weights_dir,
    load_generator_files,
    upsample_file,
)
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
        # ANTsPy is there and runs (a short fit: this checks the installation, not the field)
        quick = {"iters": [5, 5], "tol": 1e-4}
        head = phantom()
        corrected = n4_correct(head, (1.0, 1.0, 1.0), convergence=quick)
        if corrected.shape != head.shape or not np.isfinite(corrected).all():
            raise MrisrError("selftest: N4 bias correction returned an invalid image")
        save_volume(folder / "hr.nii.gz", corrected, affine)
        config = DegradationConfig(n4=False)
        degrade_file(folder / "hr.nii.gz", folder / "lr.nii.gz", config)
        weights = folder / "tiny.safetensors"
        save_weights(weights, build_network(TINY_RRDG).state_dict(), TINY_RRDG, config)
        generator = load_generator_files(weights, None).generator(1.0, device)
        options = UpsampleOptions(inference=InferenceOptions(device=device, batch_size=2))
        result = upsample_file(folder / "lr.nii.gz", folder / "sr.nii.gz", generator, options)
        out = load_volume(folder / "sr.nii.gz")
        if out.data.shape != head.shape or not np.allclose(out.affine, affine):
            raise MrisrError("selftest: output geometry differs from the input's")
        return (
            f"{result.output_shape} phantom through N4, degradation and a tiny random RRDG on "
            f"{device} in {result.seconds['total']:.2f} s; {installed_weights_report(device)}"
        )


def installed_weights_report(device: str) -> str:
    """Load the default weights (``$MRISR_WEIGHTS`` or the installed ones) and blend them once."""
    folder = default_weights_dir()
    if not (folder / DEFAULT_PSNR_NAME).is_file():
        return f"no trained weights installed in {folder}"
    files = load_generator_files(None, None)
    files.generator(0.5 if files.gan is not None else 1.0, device)
    loaded = ", ".join(f"{Path(s['path']).name} ({s['sha256'][:12]})" for s in files.sources())
    return f"trained weights load: {loaded}"
