"""The released weights in weights/: they load, they beat their input, alpha blends between them.

Skipped where the weights are not installed (a checkout without them) or the real data is absent.
The crop is one 64x40x64 tile of a real test-split scan, so that the full-size RRDG runs in
seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mrisr_cli.cli import app
from mrisr_cli.degradation import degrade_volume
from mrisr_cli.inference import InferenceOptions
from mrisr_cli.metrics import psnr
from mrisr_cli.pipeline import default_weights_dir, load_generator_files, upsample_array
from mrisr_cli.weights import load_weights
from tests.conftest import real_volume

PSNR_FILE = default_weights_dir() / "rrdg_psnr.safetensors"
GAN_FILE = default_weights_dir() / "rrdg_gan.safetensors"
TEST_SCAN = "t1/S18_voxelmorph_test_vol.nii.gz"  # in the test split of the model card
CROP = (58, 34, 58)  # one tile of the paper's grid (64x40x64 less the 3-voxel crop)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PSNR_FILE.is_file(), reason="no released weights in weights/"),
]


def test_released_weights_load_with_their_settings() -> None:
    for path, stage in ((PSNR_FILE, "psnr"), (GAN_FILE, "gan")):
        weights = load_weights(path)
        assert weights.network.name == "rrdg" and weights.network.params == {}
        assert weights.provenance["stage"] == stage
        assert weights.degradation.factor == 2 and weights.degradation.axes == (0, 2)


@pytest.fixture(scope="module")
def crop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(str(real_volume(TEST_SCAN))))
    data = np.asarray(image.dataobj, dtype=np.float32)
    start = [(n - c) // 2 for n, c in zip(data.shape, CROP, strict=True)]
    start = [s - s % 2 for s in start]
    hr = data[tuple(slice(s, s + c) for s, c in zip(start, CROP, strict=True))]
    lr = degrade_volume(hr, load_weights(PSNR_FILE).degradation)
    path = tmp_path_factory.mktemp("released") / "lr.nii.gz"
    nib.save(nib.Nifti1Image(lr, np.eye(4)), str(path))
    return path, hr, lr


def test_upsample_with_the_released_model_beats_its_input(
    crop: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    path, hr, lr = crop
    out = tmp_path / "sr.nii.gz"
    result = CliRunner().invoke(app, ["upsample", str(path), str(out), "--no-n4"])
    assert result.exit_code == 0, result.output
    sr = np.asarray(nib.load(str(out)).dataobj, dtype=np.float32)
    scale = float(hr.max() - hr.min())
    before = psnr(hr / scale, lr / scale)
    after = psnr(hr / scale, sr / scale)
    print(f"released RRDG on a {CROP} crop of {TEST_SCAN}: LR {before:.2f} dB -> SR {after:.2f} dB")
    assert after > before + 0.5


def test_alpha_moves_the_output_monotonically_between_the_two_models(
    crop: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    """Blending is about the weights, not the tiling: the middle 24^3 of the crop's degraded
    volume in one 30^3 patch, a third of the full-size RRDG's time on the whole tile."""
    _, _, lr = crop
    middle = lr[tuple(slice((n - 24) // 2, (n - 24) // 2 + 24) for n in lr.shape)]
    files = load_generator_files(PSNR_FILE, GAN_FILE)
    options = InferenceOptions(patch=(30, 30, 30))
    outputs = {
        alpha: upsample_array(middle, files.generator(alpha, "cpu"), options=options)
        for alpha in (0.0, 0.5, 1.0)
    }
    to_psnr = [float(np.abs(outputs[a] - outputs[1.0]).mean()) for a in (0.0, 0.5, 1.0)]
    to_gan = [float(np.abs(outputs[a] - outputs[0.0]).mean()) for a in (0.0, 0.5, 1.0)]
    print(f"mean |out(alpha) - out(1)| at alpha 0, 0.5, 1: {to_psnr}; to out(0): {to_gan}")
    assert to_psnr[0] > to_psnr[1] > to_psnr[2] == 0.0
    assert to_gan[0] == 0.0 < to_gan[1] < to_gan[2]
