"""`mrisr degrade` on files: the k-space degradation along canonical axes, geometry kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nibabel import orientations as ornt

from mrisr_cli.degradation import DegradationConfig, degrade_volume, lowres_affine, lowres_volume
from mrisr_cli.errors import OutputError
from mrisr_cli.volumes import canonical_reorientation, check_output_path, load_volume, save_volume

#: How far from 1 mm a voxel may be before `degrade` warns (the 0.8-1.2 mm of real "1 mm" scans).
ONE_MM_TOLERANCE = 0.25


def degrade_file(
    hr_path: Path,
    lr_path: Path,
    config: DegradationConfig,
    *,
    lowres_path: Path | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write the degraded volume on the input grid (and optionally the true low-res volume);
    return warnings for the user.

    The low-resolution volume is written in the input's axis order (same orientation codes), so
    that ``mrisr upsample`` puts it back on exactly the grid of the degraded volume.
    """
    check_distinct_paths(hr_path, lr_path, lowres_path)
    check_output_path(lr_path, overwrite=overwrite)
    if lowres_path is not None:
        check_output_path(lowres_path, overwrite=overwrite)
    volume = load_volume(hr_path)
    warnings = []
    spacing = np.array(volume.spacing)
    if np.any(np.abs(spacing - 1.0) > ONE_MM_TOLERANCE):
        sizes = "x".join(f"{z:.2g}" for z in spacing)
        warnings.append(
            f"{hr_path}: voxels of {sizes} mm; the degradation crops k-space by voxel, as for the "
            "1 mm images the models are trained on, so this low-resolution image is not theirs"
        )
    reo = canonical_reorientation(volume.affine, volume.data.shape)
    canonical = reo.apply(volume.data)
    degraded = degrade_volume(canonical, config, affine=reo.canonical_affine)
    save_volume(lr_path, reo.undo(degraded), volume.affine, volume.header, overwrite=overwrite)
    if lowres_path is not None:
        low = lowres_volume(canonical, config)
        canonical_affine = lowres_affine(reo.canonical_affine, canonical.shape, config.factors())
        # back to the input's axis order: the same flips and permutation, on the smaller shape
        affine = canonical_affine @ ornt.inv_ornt_aff(reo.from_canonical, low.shape)
        save_volume(lowres_path, reo.undo(low), affine, volume.header, overwrite=overwrite)
    return warnings


def _same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file (after symlinks; hard links too, where both exist)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct_paths(hr_path: Path, lr_path: Path, lowres_path: Path | None) -> None:
    """Refuse, before anything is written, outputs that are the same file as each other or as
    the input (writing the first would clobber the other or fail half-way)."""
    if _same_file(lr_path, hr_path):
        raise OutputError(f"{lr_path}: the output is the input file; choose another name")
    if lowres_path is None:
        return
    if _same_file(lowres_path, hr_path):
        raise OutputError(f"{lowres_path}: --keep-lowres is the input file; choose another name")
    if _same_file(lowres_path, lr_path):
        raise OutputError(
            f"{lowres_path}: --keep-lowres names the same file as the degraded output; "
            "choose another name"
        )
