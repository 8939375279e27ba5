"""Dataset packs (`mrisr_cli.compact`): small enough to travel, and unpacked they train the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mrisr_cli.compact import dequantise, pack_dataset, quantise, unpack_dataset
from mrisr_cli.errors import InputError
from mrisr_cli.manifest import load_manifest
from mrisr_cli.patches import open_split
from mrisr_cli.prepare import prepare_dataset
from tests.test_prepare import NO_N4, head, save


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compact")
    for k in range(4):
        # air around the head, so that the pack crops it away
        volume = np.zeros((84, 80, 86), np.float32)
        volume[8:76, 7:73, 8:78] = head(k)
        save(root / "src" / f"sub-0{k + 1}_T1w.nii.gz", volume)
    prepare_dataset(root / "src", root / "prepared", NO_N4)
    return root / "prepared"


def test_quantise_round_trip_error_is_half_a_step() -> None:
    data = np.random.default_rng(0).normal(0, 2, (20, 20, 20)).astype(np.float32)
    codes, low, high = quantise(data)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 255
    error = np.abs(dequantise(codes, low, high) - data).max()
    assert error <= (high - low) / 255 / 2 + 1e-6


def test_pack_then_unpack_gives_the_prepared_dataset_back(prepared: Path, tmp_path: Path) -> None:
    pack = pack_dataset(prepared, tmp_path / "pack")
    packed = sum(p.stat().st_size for p in (tmp_path / "pack").iterdir())
    original = sum(p.stat().st_size for p in (prepared / "subjects").rglob("*.npy"))
    print(f"pack {packed / 1e6:.2f} MB vs prepared {original / 1e6:.2f} MB")
    assert packed < original / 4
    manifest = unpack_dataset(tmp_path / "pack", tmp_path / "unpacked", jobs=2)
    before, after = load_manifest(prepared), load_manifest(tmp_path / "unpacked")
    assert {s["id"]: s["split"] for s in before.subjects} == {
        s["id"]: s["split"] for s in after.subjects
    }
    assert after.degradation == before.degradation
    assert sum(manifest["counts"].values()) == len(before.subjects) == 4
    for record in after.subjects:
        start = np.array(record["packed"]["crop_start"])
        old = prepared / "subjects" / record["id"]
        new = tmp_path / "unpacked" / "subjects" / record["id"]
        box = tuple(slice(a, a + n) for a, n in zip(start, record["shape"], strict=True))
        assert min(record["shape"]) < min(np.load(old / "hr.npy").shape)  # air was cropped
        hr_a, lr_a, hr_b, lr_b = (
            np.load(folder / f"{name}.npy")[crop].astype(np.float32)
            for folder, crop in ((old, box), (new, ...))
            for name in ("hr", "lr")
        )
        assert np.abs(hr_a - hr_b).max() < 0.03  # 8-bit quantisation of about 7 z-units
        # the LR is made again on the cropped grid: its DFT samples other frequencies, so the
        # windowed band differs a little (most on this phantom's sharp 160-to-0 edges: real
        # scans measured 1-3% of the degradation); less than the degradation itself
        change, degraded = np.abs(lr_a - lr_b).mean(), np.abs(lr_a - hr_a).mean()
        print(f"{record['id']}: LR remade vs prepared {change:.4f}, vs HR {degraded:.4f}")
        assert change < 0.4 * degraded
        mask_a = np.load(old / "mask.npy")[box].astype(bool)
        mask_b = np.load(new / "mask.npy").astype(bool)
        assert (mask_a != mask_b).mean() < 1e-3
        old_affine = np.asarray(
            next(s for s in before.subjects if s["id"] == record["id"])["affine"]
        )
        moved = old_affine @ np.append(start, 1.0)
        np.testing.assert_allclose(np.asarray(record["affine"])[:, 3], moved, atol=1e-6)
    assert len(open_split(after, "train")) == len(before.split("train"))
    assert pack["subjects"][0]["file"].endswith(".npz")


def test_unpack_refuses_what_is_not_a_pack(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"pack\.json"):
        unpack_dataset(tmp_path, tmp_path / "out")
