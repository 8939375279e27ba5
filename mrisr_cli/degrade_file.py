"""`mrisr degrade` on files: the k-space degradation along canonical axes, geometry kept."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from nibabel import orientations as ornt

from mrisr_cli.degradation import DegradationConfig, degrade_volume, lowres_affine, lowres_volume
from mrisr_cli.errors import InputError, OutputError
from mrisr_cli.volumes import (
    NIFTI_SUFFIXES,
    atomic_path,
    canonical_reorientation,
    check_output_path,
    is_volume_path,
    load_volume,
    os_reason,
    same_file,
    write_volume,
)

#: How far from 1 mm a voxel may be before `degrade` warns (the 0.8-1.2 mm of real "1 mm" scans).
ONE_MM_TOLERANCE = 0.25


def degrade_file(
    hr_path: Path | str,
    lr_path: Path | str,
    config: DegradationConfig,
    *,
    lowres_path: Path | str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write the degraded volume on the input grid (and optionally the true low-res volume);
    return warnings for the user.

    The low-resolution volume is written in the input's axis order (same orientation codes), so
    that ``mrisr upsample`` puts it back on exactly the grid of the degraded volume.
    """
    hr_path, lr_path = Path(hr_path), Path(lr_path)
    lowres_path = Path(lowres_path) if lowres_path is not None else None
    check_image_name(lr_path, "")
    if lowres_path is not None:
        check_image_name(lowres_path, "--keep-lowres ")
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
    try:
        degraded = reo.undo(degrade_volume(canonical, config, affine=reo.canonical_affine))
    except InputError as exc:  # too small, or a --window that vanishes on it: name the file
        raise InputError(f"{hr_path}: {exc}") from exc
    # With --keep-lowres both files are written in full to hidden temporary files before either
    # is renamed into place, so a failed write leaves neither. LOW is renamed first, then LR;
    # should that last rename fail, a LOW that did not exist before is removed again (one that
    # --overwrite replaced cannot be given back: the error says which file failed).
    low_existed = lowres_path is not None and lowres_path.exists()
    low_in_place = False
    try:
        with _staged_image(lr_path, overwrite=overwrite) as lr_tmp:
            write_volume(lr_tmp, degraded, volume.affine, volume.header, name=lr_path)
            if lowres_path is not None:
                low = lowres_volume(canonical, config)
                factors = config.factors()
                low_affine = lowres_affine(reo.canonical_affine, canonical.shape, factors)
                # back to the input's axis order: the same flips and permutation, smaller shape
                low_affine = low_affine @ ornt.inv_ornt_aff(reo.from_canonical, low.shape)
                with _staged_image(lowres_path, overwrite=overwrite) as low_tmp:
                    low_data = reo.undo(low)
                    write_volume(low_tmp, low_data, low_affine, volume.header, name=lowres_path)
                low_in_place = True
    except BaseException:
        if low_in_place and not low_existed and lowres_path is not None:
            lowres_path.unlink(missing_ok=True)
        raise
    return warnings


def _suffix_list() -> str:
    names = list(NIFTI_SUFFIXES)
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def check_image_name(path: Path, what: str) -> None:
    """Refuse an output that is a folder or lacks an image suffix, before anything is written.

    ``what`` names the option (``"--keep-lowres "``) or is empty for the LR argument.
    """
    if Path(path).is_dir():
        raise OutputError(f"{path}: {what}is a folder; give an image file name")
    if not is_volume_path(Path(path)):
        kind = f"{what}file" if what else "output file"
        raise OutputError(f"{path}: {kind} must end in {_suffix_list()}")


@contextmanager
def _staged_image(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """A hidden temporary image path beside ``path``, renamed onto it when the block succeeds,
    removed when it fails (:func:`~mrisr_cli.volumes.atomic_path`); a failed rename names
    ``path``."""
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            yield tmp
    except OSError as exc:  # the renames (a write failing is an OutputError already)
        raise OutputError(f"{path}: could not write ({os_reason(exc)})") from exc


def check_distinct_paths(hr_path: Path, lr_path: Path, lowres_path: Path | None) -> None:
    """Refuse, before anything is written, outputs that are the same file as each other or as
    the input (writing the first would clobber the other or fail half-way)."""
    if same_file(lr_path, hr_path):
        raise OutputError(f"{lr_path}: the output is the input file; choose another name")
    if lowres_path is None:
        return
    if same_file(lowres_path, hr_path):
        raise OutputError(f"{lowres_path}: --keep-lowres is the input file; choose another name")
    if same_file(lowres_path, lr_path):
        raise OutputError(
            f"{lowres_path}: --keep-lowres names the same file as the degraded output; "
            "choose another name"
        )
