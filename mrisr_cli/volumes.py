"""Reading, checking, reorienting and atomically writing 3D brain volumes.

Every way an input file can be unusable becomes one :class:`InputError` line here, so the
pipeline code after it can assume a finite, non-empty 3D float32 array. Outputs are written to a
temporary file in the target folder and renamed, so a crash never leaves a half-written NIfTI.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from mrisr_cli.errors import InputError, OutputError

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")


@dataclass
class Volume:
    """A checked 3D volume: float32 data, its affine, and the header it came with."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def is_volume_path(path: Path) -> bool:
    """True for file names mrisr reads (NIfTI-1/2, also FreeSurfer MGH/MGZ)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image suffix: ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(path: Path) -> Volume:
    """Read a 3D image (a 4D file with one volume is accepted) and check it is usable."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for foreign files
        reason = _short(exc).replace(str(path), "it")
        raise InputError(f"{path}: not a NIfTI/MGH image ({reason})") from exc
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise InputError(f"{path}: not a volumetric image")
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(image.shape)}")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: file is truncated or corrupt ({_short(exc)})") from exc
    check_finite_and_nonempty(data, str(path))
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_qform(image.affine, code=1)
    header.set_sform(image.affine, code=1)
    if isinstance(image.header, nib.Nifti1Header):
        header = image.header.copy()
    return Volume(data=data, affine=image.affine.copy(), header=header, path=path)


def check_finite_and_nonempty(data: np.ndarray, what: str) -> None:
    """Refuse NaN/Inf voxels and volumes without signal."""
    if min(data.shape) < 2:
        raise InputError(f"{what}: volume of shape {data.shape} is too thin to be a 3D scan")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{what}: {bad} NaN or infinite voxels; fix or mask them first")
    if float(data.max()) == float(data.min()):
        raise InputError(f"{what}: volume is empty (every voxel is {float(data.min()):g})")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


# --- orientation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reorientation:
    """How a volume's voxel axes map to the RAS+ canonical axes, and back."""

    to_canonical: np.ndarray
    from_canonical: np.ndarray
    canonical_affine: np.ndarray

    def apply(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(ornt.apply_orientation(data, self.to_canonical))

    def undo(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(ornt.apply_orientation(data, self.from_canonical))


def canonical_reorientation(affine: np.ndarray, shape: tuple[int, ...]) -> Reorientation:
    """The axis flips/permutations that nibabel's ``as_closest_canonical`` would apply."""
    source = ornt.io_orientation(affine)
    target = ornt.axcodes2ornt(("R", "A", "S"))
    forward = ornt.ornt_transform(source, target)
    backward = ornt.ornt_transform(target, source)
    canonical_affine = affine @ ornt.inv_ornt_aff(forward, shape)
    return Reorientation(forward, backward, canonical_affine)


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle between a voxel axis and its closest world axis, in degrees."""
    rotation = affine[:3, :3] / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    cosines = np.abs(rotation).max(axis=0).clip(0.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


# --- writing --------------------------------------------------------------------------------


def check_output_path(path: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing output or to write into a missing/read-only folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists (use --overwrite to replace it)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder is not writable")


@contextmanager
def atomic_path(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success."""
    path = Path(path)
    check_output_path(path, overwrite=overwrite)
    folder = path.parent if str(path.parent) else Path(".")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".part{suffix}", dir=folder
        )
    except OSError as exc:
        raise OutputError(f"{folder}: output folder is not writable ({_short(exc)})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: appeared while writing (use --overwrite to replace it)")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_volume(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    *,
    dtype: np.dtype | type = np.float32,
    overwrite: bool = False,
) -> None:
    """Write a NIfTI with the given geometry, atomically; data are stored as ``dtype``."""
    header = header.copy() if header is not None else nib.Nifti1Header()
    array = np.asarray(data, dtype=dtype)
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    qcode = int(header["qform_code"]) or 1
    scode = int(header["sform_code"]) or 1
    image.set_qform(affine, code=qcode)
    image.set_sform(affine, code=scode)
    with atomic_path(Path(path), overwrite=overwrite) as tmp:
        try:
            nib.save(image, str(tmp))
        except OSError as exc:
            raise OutputError(f"{path}: could not write ({_short(exc)})") from exc
