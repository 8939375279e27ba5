"""Putting an input onto the model's grid: canonical axes, 1 mm voxels, coarse axes where the
model expects them; and undoing all of it for the output.

A 1 mm scan (or a volume already degraded on the 1 mm grid) is used as it is. A genuinely
low-resolution acquisition (e.g. 2 x 1 x 2 mm) is interpolated onto the model's spacing along its
coarse axes, the same last step as the training degradation, and its axes are permuted so that
the coarse ones are the model's degraded axes; the output is written on that finer grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from nibabel import orientations as ornt

from mrisr_cli.degradation import INTERPOLATION_ORDERS, DegradationConfig, resample_onto_grid
from mrisr_cli.errors import InputError
from mrisr_cli.volumes import Reorientation, canonical_reorientation, obliquity_degrees

ON_GRID_TOLERANCE = 1.25  # voxels up to 1.25 x the model spacing count as on its grid
FINEST_SPACING_RATIO = 0.8  # finer than 0.8 x the model spacing: outside what it saw
MAX_OBLIQUITY_DEGREES = 30.0


@dataclass(frozen=True)
class GridPlan:
    """How one input maps onto the model's grid and back."""

    reorientation: Reorientation
    input_shape: tuple[int, int, int]
    canonical_spacing: tuple[float, float, float]
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    coarse_axes: tuple[int, ...]
    permutation: tuple[int, int, int]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    order: int = 1  # spline order onto the model grid: the degradation's last step, as trained

    @property
    def resampled(self) -> bool:
        return bool(self.coarse_axes)

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        zooms = np.sqrt((self.model_affine[:3, :3] ** 2).sum(axis=0))
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))

    def output_affine(self) -> np.ndarray:
        """Affine of the output in the input's own axis order."""
        back = self.reorientation.from_canonical
        return self.model_affine @ ornt.inv_ornt_aff(back, self.model_shape)

    def to_model(self, data: np.ndarray) -> np.ndarray:
        """Input array -> canonical, resampled array (not yet permuted)."""
        canonical = self.reorientation.apply(data)
        if not self.resampled:
            return canonical
        return resample_onto_grid(
            canonical,
            self.reorientation.canonical_affine,
            self.model_shape,
            self.model_affine,
            order=self.order,
        )

    def permute(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(data, self.permutation))

    def unpermute(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(data, np.argsort(self.permutation)))

    def to_output(self, data: np.ndarray) -> np.ndarray:
        """Canonical model-grid array -> the input's axis order (on the model grid)."""
        return self.reorientation.undo(data)


def _permutation_for(coarse: tuple[int, ...], model_axes: tuple[int, ...]) -> tuple[int, int, int]:
    """Axis order (for ``np.transpose``) that moves the coarse axes into the model's degraded
    slots, swapping each misplaced coarse axis with a fine axis sitting in such a slot."""
    order = [0, 1, 2]
    if len(coarse) > len(model_axes):
        return (0, 1, 2)
    for axis in coarse:
        if axis in model_axes:
            continue
        slot = next(s for s in model_axes if order[s] not in coarse)
        here = order.index(axis)
        order[slot], order[here] = order[here], order[slot]
    return (order[0], order[1], order[2])


def plan_grid(
    affine: np.ndarray, shape: tuple[int, int, int], config: DegradationConfig
) -> GridPlan:
    """Decide reorientation, resampling and axis permutation for one input."""
    warnings: list[str] = []
    oblique = obliquity_degrees(affine)
    if oblique > MAX_OBLIQUITY_DEGREES:
        raise InputError(
            f"image axes are {oblique:.0f} degrees oblique to the scanner axes; "
            "reslice it to the closest orientation first (e.g. with FSL/ANTs)"
        )
    if oblique > 1.0:
        warnings.append(f"image is {oblique:.1f} degrees oblique; processed along its voxel axes")
    reo = canonical_reorientation(affine, shape)
    canonical_shape = tuple(int(n) for n in reo.apply(np.empty(shape, dtype=np.uint8)).shape)
    zooms = np.sqrt((reo.canonical_affine[:3, :3] ** 2).sum(axis=0))
    target = config.spacing_mm
    max_spacing = target * max(config.factors()) * ON_GRID_TOLERANCE
    if zooms.max() > max_spacing:
        needed = math.ceil(zooms.max() / target / ON_GRID_TOLERANCE)
        raise InputError(
            f"voxels of {zooms.max():.2f} mm are coarser than a x{config.factor} model can "
            f"restore (at most {max_spacing:.2f} mm at {target:g} mm); such scans need a model "
            f"trained for them (mrisr prepare --factor {needed}, then mrisr train: "
            "docs/training.md)"
        )
    if zooms.min() < target * FINEST_SPACING_RATIO:
        warnings.append(
            f"voxels of {zooms.min():.2f} mm are finer than the {target:g} mm the model was "
            "trained on; results may be poor (resample to 1 mm first)"
        )
    coarse = tuple(a for a in range(3) if zooms[a] > target * ON_GRID_TOLERANCE)
    if len(coarse) > len(config.axes):
        warnings.append(
            f"the image is coarse along {len(coarse)} axes; the model sharpens only "
            f"{len(config.axes)} of them"
        )
    scale = np.ones(3)
    model_shape = list(canonical_shape)
    for a in coarse:
        scale[a] = target / zooms[a]
        model_shape[a] = round(canonical_shape[a] * zooms[a] / target)
    model_affine = reo.canonical_affine @ np.diag([*scale, 1.0])
    return GridPlan(
        reorientation=reo,
        input_shape=tuple(shape),  # type: ignore[arg-type]
        canonical_spacing=(float(zooms[0]), float(zooms[1]), float(zooms[2])),
        model_shape=tuple(model_shape),  # type: ignore[arg-type]
        model_affine=model_affine,
        coarse_axes=coarse,
        permutation=_permutation_for(coarse, tuple(config.axes)),
        warnings=tuple(warnings),
        order=INTERPOLATION_ORDERS[config.interpolation],
    )
