"""The foreground mask: the docstring's rule (threshold, largest component, holes filled), fast."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import head_phantom
from scipy import ndimage as ndi

from mrisr_cli.intensity import (
    FOREGROUND_FRACTION,
    fill_holes,
    flat_background,
    foreground_mask,
    foreground_stats,
    largest_component,
)


def reference_mask(data: np.ndarray) -> np.ndarray:
    """The rule as the docstring states it, the plain way: threshold at ``min + 0.1 (p99 - min)``
    (p99 over the voxels above the minimum), keep the largest face-connected component (the first
    one on a tie), fill its holes."""
    low = float(data.min())
    above = data[data > low]
    if above.size == 0:
        return np.zeros(data.shape, dtype=bool)
    mask = data > low + FOREGROUND_FRACTION * (float(np.percentile(above, 99)) - low)
    labels, count = ndi.label(mask)
    if count > 1:
        sizes = [int((labels == k).sum()) for k in range(1, count + 1)]
        mask = labels == 1 + sizes.index(max(sizes))
    return ndi.binary_fill_holes(mask)


def noisy_head(seed: int = 0) -> np.ndarray:
    """A whole head with a dark cavity (a hole after thresholding) in air with Rician-like noise
    (thousands of small components above the threshold)."""
    rng = np.random.default_rng(seed)
    data = np.abs(rng.normal(0, 9.0, (48, 40, 52))).astype(np.float32)
    data[6:42, 5:37, 6:48] += head_phantom((36, 32, 42), seed=seed)
    data[20:26, 17:23, 22:30] = 0.0  # a cavity inside the head
    return data


def several_blobs() -> np.ndarray:
    """Separate objects of different sizes, some on the array's faces: a closed shell (its inside
    is a hole), an open box (its inside reaches the box's face, not a hole), a solid block in a
    corner, and the largest, a thick shell cut by the array's face (its inside touches the array's
    border, not a hole)."""
    data = np.zeros((40, 44, 36), np.float32)
    data[2:12, 2:12, 2:12] = 100.0  # closed shell: 10^3 block ...
    data[4:10, 4:10, 4:10] = 0.0  # ... hollow inside
    data[20:30, 2:12, 2:14] = 80.0  # open box: walls and floor ...
    data[22:28, 4:10, 4:14] = 0.0  # ... open on its last face along axis 2
    data[:5, 38:, 30:] = 90.0  # a block in the array's corner
    data[14:40, 16:44, 14:36] = 120.0  # the largest: a thick shell touching three faces ...
    data[20:40, 22:44, 20:30] = 0.0  # ... whose inside is open to the array's border
    data[30:34, 30:34, 24:27] = 120.0  # an island inside it (dropped, and not a hole)
    data[25:28, 25:28, 16:18] = 0.0  # a cavity in its thick wall: a hole
    return data


def cup(closed: bool) -> np.ndarray:
    """One hollow box in the middle of the array, open on one face of its bounding box or not."""
    data = np.zeros((30, 32, 30), np.float32)
    data[5:25, 6:26, 5:25] = 100.0
    data[8:22, 9:23, 8 : 22 if closed else 25] = 0.0
    return data


def smooth_random(seed: int) -> np.ndarray:
    """Blobs with tunnels, cavities and diagonal-only contacts: smoothed noise."""
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.normal(size=(36, 30, 40)), 1.5).astype(np.float32)


@pytest.mark.parametrize(
    "data",
    [
        noisy_head(0),
        noisy_head(1).astype(np.int16),
        several_blobs(),
        cup(closed=True),
        cup(closed=False),
        head_phantom((30, 26, 34)),  # skull-stripped-like: exact-zero background
        *(smooth_random(seed) for seed in range(4)),
        np.full((8, 9, 10), 3.0, np.float32),  # nothing above the minimum
    ],
    ids=[
        *("noisy-head", "noisy-head-int16", "several-blobs", "closed-box", "open-box", "phantom"),
        *("random-0", "random-1", "random-2", "random-3", "flat"),
    ],
)
def test_foreground_mask_equals_the_straightforward_rule(data: np.ndarray) -> None:
    expected = reference_mask(data)
    got = foreground_mask(data)
    assert got.dtype == bool and got.shape == data.shape
    np.testing.assert_array_equal(got, expected)


def test_the_test_volumes_exercise_components_and_holes() -> None:
    """The cases above are not trivial: several components, holes filled and not filled."""
    for data in (noisy_head(0), several_blobs()):
        low = float(data.min())
        threshold = low + FOREGROUND_FRACTION * (float(np.percentile(data[data > low], 99)) - low)
        above = data > threshold
        assert ndi.label(above)[1] > 3
        kept = reference_mask(data)
        assert (kept & ~above).any()  # a hole was filled
        assert (above & ~kept).any()  # another component was dropped
    blobs = foreground_mask(several_blobs())
    assert not blobs[25, 30, 25]  # inside the largest shell, open to the border: not filled
    assert not blobs[32, 32, 25]  # the island in there: dropped, and not a hole
    assert blobs[26, 26, 17]  # the cavity in the wall: filled
    assert not blobs[6, 6, 6]  # the closed shell is not the largest component
    assert foreground_mask(cup(closed=True))[15, 15, 15]
    assert not foreground_mask(cup(closed=False))[15, 15, 15]


def test_largest_component_and_fill_holes_equal_scipy_on_random_masks() -> None:
    rng = np.random.default_rng(7)
    for _ in range(6):
        mask = ndi.gaussian_filter(rng.normal(size=(30, 34, 28)), 1.2) > rng.uniform(-0.1, 0.2)
        labels, count = ndi.label(mask)
        sizes = ndi.sum_labels(mask, labels, index=np.arange(1, count + 1))
        np.testing.assert_array_equal(largest_component(mask), labels == 1 + int(np.argmax(sizes)))
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    tie = np.zeros((6, 6, 6), bool)
    tie[0, 0, :2] = tie[5, 5, :2] = True  # two components of two voxels: the first is kept
    first = np.zeros_like(tie)
    first[0, 0, :2] = True
    np.testing.assert_array_equal(largest_component(tie), first)
    np.testing.assert_array_equal(fill_holes(np.zeros((3, 4, 5), bool)), np.zeros((3, 4, 5), bool))
    np.testing.assert_array_equal(fill_holes(np.ones((3, 4, 5), bool)), np.ones((3, 4, 5), bool))


def test_foreground_mask_avoids_the_slow_scipy_steps(monkeypatch) -> None:
    """Per-label sums over 10^5-10^6 noise components and fill-by-dilation took most of 4 s on
    a 256^3 head; the mask uses one bincount and one background labelling instead."""

    def slow(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("slow path used")

    expected = reference_mask(noisy_head(2))
    for name in ("sum_labels", "sum", "labeled_comprehension", "binary_fill_holes"):
        monkeypatch.setattr(ndi, name, slow)
    np.testing.assert_array_equal(foreground_mask(noisy_head(2)), expected)


def test_foreground_stats_use_the_mask() -> None:
    data = noisy_head(3)
    mask = reference_mask(data)
    stats = foreground_stats(data)
    assert stats.mean == pytest.approx(float(data[mask].mean()))
    assert stats.std == pytest.approx(float(data[mask].std()))


@pytest.mark.parametrize("case", ["phantom", "touches_faces", "all_flat", "pocket", "no_flat"])
def test_flat_background_is_the_minimum_reaching_the_faces(case: str) -> None:
    """Checked against an independent flood fill (binary propagation from the faces)."""
    rng = np.random.default_rng(3)
    data = np.zeros((24, 20, 26), dtype=np.float32)
    if case in ("phantom", "pocket"):
        data[5:19, 4:16, 6:20] = rng.uniform(1, 2, (14, 12, 14))
        data[8:10, 8:10, 10:12] = 0 if case == "pocket" else data[8:10, 8:10, 10:12]
        data[rng.random(data.shape) < 0.02] = 0  # scattered zeros, inside and out
    elif case == "touches_faces":
        data[:, 5:9, :] = rng.uniform(1, 2, (24, 4, 26))  # a slab that splits the background
    elif case == "no_flat":
        data = rng.uniform(1, 2, data.shape).astype(np.float32)
    flat = data == data.min()
    seeds = np.zeros_like(flat)
    for axis in range(3):
        for end in (0, -1):
            index = [slice(None)] * 3
            index[axis] = end
            seeds[tuple(index)] = flat[tuple(index)]
    expected = ndi.binary_propagation(seeds, mask=flat)
    np.testing.assert_array_equal(flat_background(data), expected)
    if case == "pocket":
        assert not flat_background(data)[8:10, 8:10, 10:12].any()
