"""Shared fixtures: tiny networks saved with the real weights I/O, small NIfTI files, real data.

Real T1 volumes are found through ``MRISR_DATA`` (default: ``../shared/data`` beside the repo);
tests that need them skip cleanly when they are absent, as on a user's fresh clone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.weights import save_weights

REPO = Path(__file__).resolve().parent.parent
TINY_RRDG = NetworkConfig("rrdg", {"features": 4, "blocks": 1, "growth": 2})
# an RRDG without RRDBs: four 3x3x3 convolutions, for tests about files and geometry (3x3x3 convs
# are far cheaper on CPU than FSRCNN's 9x9x9 one)
TINY_FAST = NetworkConfig("rrdg", {"features": 4, "blocks": 0, "growth": 2})
NO_N4 = DegradationConfig(n4=False)


@pytest.fixture(autouse=True)
def _thread_settings_restored() -> object:
    """`--threads N` sets torch's, ITK's and the thread variables of the whole process: without
    this, what a test sees ("wrote ... (cpu, 2 threads)") depended on the tests before it."""
    from mrisr_cli.threads import THREAD_ENV_VARS

    saved_env = {name: os.environ.get(name) for name in THREAD_ENV_VARS}
    saved_torch = torch.get_num_threads()
    try:
        import SimpleITK as sitk

        saved_itk: int | None = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    except ImportError:
        saved_itk = None
    yield
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    torch.set_num_threads(saved_torch)
    if saved_itk is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved_itk)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip where torch sees no CUDA GPU, as README says."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def data_dir() -> Path:
    return Path(os.environ.get("MRISR_DATA", REPO.parent / "shared" / "data"))


def real_volume(relative: str) -> Path:
    """Path of a real volume under the data folder, or skip the test."""
    path = data_dir() / relative
    if not path.is_file():
        pytest.skip(f"real data not available: {path}")
    return path


def write_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype: type = np.float32
) -> Path:
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.eye(4) if affine is None else affine)
    nib.save(image, str(path))
    return path


def head_phantom(shape: tuple[int, int, int] = (40, 36, 44), seed: int = 0) -> np.ndarray:
    """Ellipsoid 'head' with textured 'brain' and exact-zero background."""
    from mrisr_cli.selftest import phantom

    return phantom(shape, seed)


def tiny_weights(path: Path, seed: int, config: NetworkConfig = TINY_RRDG) -> Path:
    """A tiny network with random weights (and non-trivial BN statistics) saved for real."""
    torch.manual_seed(seed)
    model = build_network(config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    save_weights(path, model.state_dict(), config, NO_N4)
    return path


@pytest.fixture
def psnr_weights(tmp_path: Path) -> Path:
    return tiny_weights(tmp_path / "psnr.safetensors", seed=1)


@pytest.fixture
def gan_weights(tmp_path: Path) -> Path:
    return tiny_weights(tmp_path / "gan.safetensors", seed=2)


@pytest.fixture
def phantom_file(tmp_path: Path) -> Path:
    return write_nifti(tmp_path / "phantom.nii.gz", head_phantom())


@pytest.fixture
def fast_weights(tmp_path: Path) -> Path:
    return tiny_weights(tmp_path / "fast.safetensors", seed=4, config=TINY_FAST)


def n4_stop_script(module: str, name: str) -> str:
    """``python -c`` source of mrisr's CLI with N4 made long and ``mrisr_cli.<module>.<name>`` (the
    command's N4 call) touching the file named by the first argument as it starts; the CLI's own
    arguments follow. For :func:`sigterm_once_started`."""
    return f"""
import pathlib, sys
from mrisr_cli import n4, {module}
n4.N4_CONVERGENCE = {{"iters": [10_000], "tol": 0.0}}  # minutes: a stop lands inside N4
real, started = {module}.{name}, pathlib.Path(sys.argv[1])

def marked(*args, **kwargs):
    started.touch()
    return real(*args, **kwargs)

{module}.{name} = marked
from mrisr_cli.cli import main
sys.argv = ["mrisr", *sys.argv[2:]]
main()
"""


def sigterm_once_started(command: list[str], started: Path) -> list[str]:
    """Run ``command``; 4 s after it creates ``started`` (its N4 process started, ANTs imported),
    send SIGTERM, as a SLURM time limit does. It must exit 128 + 15 within 5 s of the signal with
    one stderr line naming SIGTERM; that line is returned (as a list, for exact checks)."""
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 300
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), process.communicate(timeout=300)
        time.sleep(4.0)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=600)
        late = time.monotonic() - sent
    assert process.returncode == 128 + 15, stderr
    assert len(stderr.strip().splitlines()) == 1 and "SIGTERM" in stderr, stderr
    assert late < 5.0, f"exited {late:.1f} s after SIGTERM"
    return stderr.strip().splitlines()
