"""Reading, checking, reorienting and atomically writing 3D brain volumes.

Every way an input file can be unusable becomes one :class:`InputError` line here, so the
pipeline code after it can assume a finite, non-empty 3D float32 array. Outputs are written to a
temporary file in the target folder and renamed, so a crash never leaves a half-written NIfTI.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from mrisr_cli.errors import InputError, OutputError

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
#: A link whose file is missing: in DataLad/git-annex datasets, content not yet fetched.
BROKEN_LINK = "a link to a missing file (in a DataLad dataset, run datalad get first)"


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


def image_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    """The images in ``folder`` (and below it with ``recursive``), sorted. Hidden files are left
    out: macOS ``._`` files and the ``.name.part`` files of an interrupted write are not scans.
    Links to missing files are kept, so that reading them says so instead of skipping them."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and is_volume_path(p)
        and not p.name.startswith(".")
    )


def image_suffix(name: str) -> str | None:
    """The image suffix a name ends in, in lower case (``X.NII.GZ`` -> ``.nii.gz``), or None."""
    lower = name.lower()
    return next((s for s in NIFTI_SUFFIXES if lower.endswith(s)), None)


def strip_suffix(name: str) -> str:
    """File name without its image suffix: ``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def load_volume(path: Path) -> Volume:
    """Read a 3D image (a 4D file with one volume is accepted) and check it is usable."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {BROKEN_LINK if path.is_symlink() else 'no such file'}")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    with _nibabel_header_fixes() as fixes, nibabel_readable(path) as readable:
        try:
            image = nib.load(str(readable))
        except Exception as exc:  # nibabel raises many types for foreign files
            raise InputError(f"{path}: {_unreadable_reason(path, exc)}") from exc
        volume = _checked_volume(image, path, fixes)
    _check_gzip_stream(path)
    check_finite_and_nonempty(volume.data, str(path))
    return volume


def read_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from an image's header alone (no voxels read), with nibabel's header
    repairs kept quiet as :func:`load_volume` keeps them; an unreadable file is an InputError."""
    with _nibabel_header_fixes(), nibabel_readable(Path(path)) as readable:
        try:
            image = nib.load(str(readable))
            return tuple(image.shape), np.asarray(image.affine, dtype=np.float64)
        except Exception as exc:  # nibabel raises many types for foreign files
            raise InputError(f"{path}: {_unreadable_reason(Path(path), exc)}") from exc


@contextmanager
def nibabel_readable(path: Path) -> Iterator[Path]:
    """``path``, or a link to it whose suffix is in lower case while the image is read.

    nibabel matches a suffix in one case only: it looks for ``a.Nii.Gz`` as ``a.nii.Gz``. All
    lower- or upper-case names are read as they are; only mixed-case ones get the link.
    """
    suffix = image_suffix(path.name)
    if suffix is None or path.name.endswith((suffix, suffix.upper())):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mrisr-") as folder:
        link = Path(folder) / f"image{suffix}"
        try:
            link.symlink_to(path.resolve())
        except OSError:  # no links in the temporary folder: nibabel's own error follows
            link = path
        yield link


def _checked_volume(image: object, path: Path, fixes: list[str]) -> Volume:
    """The voxels and geometry of a loaded image, or the first reason they are unusable."""
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise InputError(f"{path}: not a volumetric image")
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(image.shape)}")
    # without an sform the geometry comes from pixdim, whose zeros nibabel has turned into 1 mm
    zero_pixdim = any("pixdim[1,2,3] should be non-zero" in fix for fix in fixes)
    if (
        zero_pixdim
        and isinstance(image.header, nib.Nifti1Header)
        and not image.header["sform_code"]
    ):
        raise InputError(f"{path}: the header gives a voxel size of 0 mm (pixdim)")
    check_affine(image.affine, str(path))
    check_voxel_type(np.dtype(image.get_data_dtype()), str(path))
    try:
        # a damaged stream can decode to huge values; numpy's cast warning would be printed
        # above the error line that _check_gzip_stream gives for it
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: {_unreadable_reason(path, exc, header_read=True)}") from exc
    if isinstance(image.header, nib.Nifti2Header):  # written as NIfTI-1, like every output
        with _nibabel_header_fixes():  # nibabel logs its sizeof_hdr repair
            header = nib.Nifti1Header.from_header(image.header)
    elif isinstance(image.header, nib.Nifti1Header):
        header = image.header.copy()
    else:  # MGH: its affine is scanner RAS
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_qform(image.affine, code=1)
        header.set_sform(image.affine, code=1)
    return Volume(data=data, affine=image.affine.copy(), header=header, path=path)


def _check_gzip_stream(path: Path) -> None:
    """Refuse a gzip-compressed image whose stream fails its checksum or ends early.

    nibabel reads only the bytes the image needs, so it never reaches the gzip trailer: a file
    damaged in transfer can decompress to wrong voxels without an error (an MGH file's tags
    follow its voxels, so even its truncation can go unseen). One more pass over the stream
    costs 0.05-0.2 s for a 256^3 head.
    """
    with path.open("rb") as handle:
        if handle.read(2) != GZIP_MAGIC:
            return
    _, _, problem = _contents(path, gzipped=True)
    if problem:
        raise InputError(f"{path}: {TRUNCATED_OR_CORRUPT} ({problem})")


def check_affine(affine: np.ndarray, what: str) -> None:
    """Refuse a voxel-to-world affine that is not finite, has a voxel size of 0 or is singular
    (checked in this order, so that no numpy warning is raised on the way)."""
    if not np.isfinite(affine).all():
        raise InputError(f"{what}: the header's voxel-to-world affine has NaN or infinite entries")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not (zooms > 0).all():
        sizes = " x ".join(f"{z:g}" for z in zooms)
        raise InputError(f"{what}: the header gives voxel sizes of {sizes} mm (one is 0)")
    # |det| of the affine with unit columns: 1 for orthogonal axes, 0 when two are parallel
    if abs(float(np.linalg.det(affine[:3, :3] / zooms))) < 1e-6:
        raise InputError(f"{what}: the header's voxel-to-world affine is not invertible")


def check_finite_and_nonempty(data: np.ndarray, what: str) -> None:
    """Refuse NaN/Inf voxels and volumes without signal."""
    if min(data.shape) < 2:
        raise InputError(f"{what}: volume of shape {data.shape} is too thin to be a 3D scan")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{what}: {bad} NaN or infinite voxels; fix or mask them first")
    if float(data.max()) == float(data.min()):
        raise InputError(f"{what}: volume is empty (every voxel is {float(data.min()):g})")


def check_voxel_type(dtype: np.dtype, what: str) -> None:
    """Refuse voxels that are no grey values (a file's stored type, or an array's): complex
    (raw or phase data), colour (RGB, a structured type), text or objects."""
    if dtype.kind == "c":
        raise InputError(
            f"{what}: complex-valued voxels ({dtype}, e.g. raw or phase data); give the "
            "magnitude image"
        )
    if dtype.kind not in "biuf":
        kind = "colour (RGB) voxels" if dtype.names else f"voxels of type {dtype}"
        raise InputError(f"{what}: {kind}, not the grey values of a T1")


def checked_array(data: object, what: str) -> np.ndarray:
    """An array given to a library function, as the pipeline can use it: 3D (a singleton 4th
    axis dropped) and float32 (float64 kept: the degradation computes in it), checked as
    :func:`load_volume` checks a file's voxels; else one InputError line naming ``what``.

    numpy gives odd errors or silently wrong results for the rest: NaN breaks the histograms,
    float16 overflows in the statistics, a 2D or 4D array fails deep inside the tiling.
    """
    array = np.asarray(data)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{what}: expected a 3D volume, got an array of shape {array.shape}")
    if array.dtype.kind == "b":
        raise InputError(f"{what}: a boolean array (a mask), not the grey values of a T1")
    check_voxel_type(array.dtype, what)
    if array.dtype != np.float64:
        with np.errstate(over="ignore"):  # a longdouble beyond float32: infinite, refused below
            array = array.astype(np.float32, copy=False)
    check_finite_and_nonempty(array, what)
    return array


def image_volume(image: object, what: str) -> Volume:
    """An in-memory nibabel image as a checked :class:`Volume`, as :func:`load_volume` reads a
    file (``what`` names it in errors)."""
    volume = _checked_volume(image, Path(what), [])
    check_finite_and_nonempty(volume.data, what)
    return volume


#: Fewer distinct values (on every second voxel) than this: a label map or mask, not an image.
MIN_DISTINCT_VALUES = 16


def check_not_label_map(data: np.ndarray, what: str) -> None:
    """Refuse a segmentation or mask (a handful of integer values): the networks are made for T1
    intensities, and their output would be a blur of the labels."""
    distinct = np.unique(data[::2, ::2, ::2]).size
    if distinct < MIN_DISTINCT_VALUES:
        raise InputError(
            f"{what}: only {distinct} distinct values: a label map or mask, not a T1 image"
        )


#: Name parts (BIDS suffixes, current and deprecated, and their common spellings) of images that
#: are not T1-weighted scans: other contrasts, field maps, functional, diffusion and PET series,
#: quantitative maps, masks and segmentations. Compared in lower case.
NOT_T1_SUFFIXES = frozenset(
    s.lower()
    for s in (
        "T2w", "T2star", "T2starw", "FLAIR", "PDw", "PDT2", "inplaneT2", "FLASH",
        "angio", "T1rho", "MEGRE", "MESE", "MP2RAGE", "T1map", "R1map", "T2map", "R2map",
        "T2starmap", "R2starmap", "PDmap", "M0map", "S0map", "Chimap", "MTRmap", "MTsat",
        "TB1map", "B1map", "RB1map", "bold", "boldref", "cbv", "sbref", "dwi", "dwiref", "epi",
        "asl", "m0scan", "pet", "phasediff", "phase1", "phase2", "magnitude", "magnitude1",
        "magnitude2", "fieldmap", "defacemask", "mask", "dseg", "probseg", "label",
    )
)  # fmt: skip
#: Of those, the contrasts that also lead a name (HCP's ``T2w_acpc_dc_restore.nii.gz``). Not
#: "PD" (BIDS' deprecated proton density): cohorts name Parkinson's patients' T1s ``PD_012_T1``.
NOT_T1_PREFIXES = frozenset(s.lower() for s in ("T2w", "FLAIR", "PDw", "T2star"))
#: Compared as written: FreeSurfer's ``T2.mgz``, BIDS' ``sub-01_T2``; in lower case ``t2`` is a
#: second time point as often (``P012_t2.nii.gz``, a T1 of a longitudinal study).
NOT_T1_EXACT = frozenset({"T2"})


def check_t1_name(path: Path) -> None:
    """Refuse an image that its name says is no T1-weighted scan (``sub-01_T2w.nii.gz``,
    ``T2.mgz``, ``FLAIR_brain.nii.gz``): a T2w or FLAIR header looks like a T1's, so a BIDS
    ``anat/`` folder would otherwise be super-resolved, or trained on, whole."""
    parts = strip_suffix(Path(path).name).split("_")
    first, last = parts[0], parts[-1]
    if last.lower() in NOT_T1_SUFFIXES or last in NOT_T1_EXACT:
        found = last
    elif first.lower() in NOT_T1_PREFIXES or first in NOT_T1_EXACT:
        found = first
    else:
        return
    raise InputError(
        f"{path}: its name marks it as {found}, not as a T1-weighted scan, which mrisr's "
        "models are for (name the *_T1w files, or rename this one if it is T1-weighted)"
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def os_reason(exc: OSError) -> str:
    """Why a file operation failed, without the (temporary) file name that str(exc) carries."""
    return exc.strerror or _short(exc)


GZIP_MAGIC = b"\x1f\x8b"
# the first 4 bytes of an image file (after decompression) and the size of the header they start:
# sizeof_hdr 348 (NIfTI-1) or 540 (NIfTI-2) in either byte order, or MGH's big-endian version 1
HEADER_SIZES = {
    (348).to_bytes(4, "little"): 348,
    (348).to_bytes(4, "big"): 348,
    (540).to_bytes(4, "little"): 540,
    (540).to_bytes(4, "big"): 540,
    (1).to_bytes(4, "big"): 284,
}
TRUNCATED_OR_CORRUPT = "file is truncated or corrupt"


def _unreadable_reason(path: Path, exc: BaseException, *, header_read: bool = False) -> str:
    """Why ``path`` could not be read, in words, without repeating its name: truncation and
    corruption are told apart from files that are not images at all (or, once nibabel has read
    a header, ``header_read``, from other damage)."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(2)
        start, size, problem = _contents(path, gzipped=magic == GZIP_MAGIC)
    except OSError as error:
        return f"cannot be read ({error.strerror or _without_path(_short(error), path)})"
    lower = path.name.lower()
    if lower.endswith((".gz", ".mgz")) and magic != GZIP_MAGIC and size:
        suffix = ".mgz" if lower.endswith(".mgz") else ".gz"
        return f"not a NIfTI/MGH image (named {suffix} but not gzip-compressed)"
    if problem:
        return f"{TRUNCATED_OR_CORRUPT} ({problem})"
    if magic == GZIP_MAGIC and not lower.endswith((".gz", ".mgz")) and start in HEADER_SIZES:
        return "gzip-compressed, but not named .nii.gz or .mgz (rename it)"
    if size == 0:
        return "not a NIfTI/MGH image (the file is empty)"
    if start in HEADER_SIZES and size < HEADER_SIZES[start]:
        return f"{TRUNCATED_OR_CORRUPT} (truncated: {size} bytes end inside the header)"
    expected = re.search(r"Expected (\d+) bytes, got (\d+) bytes", str(exc))
    if expected:
        wanted, found = expected.groups()
        return f"{TRUNCATED_OR_CORRUPT} (truncated: {found} of {wanted} bytes of image data)"
    if isinstance(exc, EOFError | zlib.error):
        header_read = True
    reason = _without_path(_short(exc), path)
    if header_read:
        return f"{TRUNCATED_OR_CORRUPT} ({reason})"
    if "Cannot work out file type" in str(exc):
        return "not a NIfTI/MGH image (the contents are not a NIfTI or MGH header)"
    return f"not a NIfTI/MGH image ({reason})"


def _contents(path: Path, *, gzipped: bool) -> tuple[bytes, int, str | None]:
    """The first 4 bytes and the size of a file's contents (decompressed, a gzip stream being
    read through to its end and checksum), and what is wrong with that stream, if anything."""
    if not gzipped:
        with path.open("rb") as handle:
            return handle.read(4), path.stat().st_size, None
    start, size = b"", 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                start = start or chunk[:4]
                size += len(chunk)
    except EOFError:
        return start, size, "truncated: the compressed data end before their end-of-stream marker"
    except (gzip.BadGzipFile, zlib.error) as exc:
        return start, size, f"corrupt: {_without_path(_short(exc), path)}"
    return start, size, None


def _without_path(text: str, path: Path) -> str:
    """``text`` with mentions of ``path`` (quoted or not, after "of"/"from") taken out."""
    pattern = rf"""\s*(?:\b(?:of|from|in)\s+)?["']?{re.escape(str(path))}["']?"""
    return re.sub(pattern, "", text).strip() or text


class _ThreadRecords(logging.Filter):
    """Keeps (and stops) the log records of one thread."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        self.messages.append(record.getMessage())
        return False


@contextmanager
def _nibabel_header_fixes() -> Iterator[list[str]]:
    """Collect what nibabel logs (to stderr, by default) about headers it repairs while reading,
    instead of letting it print: library code never prints."""
    logger = logging.getLogger("nibabel.global")
    records = _ThreadRecords()
    logger.addFilter(records)
    try:
        yield records.messages
    finally:
        logger.removeFilter(records)


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


def _read_umask() -> int | None:
    """The process umask from ``/proc/self/status`` (Linux), without changing it; else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    found = _read_umask()
    if found is not None:
        return found
    # no /proc: set and restore it once, at import (before any thread of ours runs)
    old = os.umask(0o022)
    os.umask(old)
    return old


UMASK_AT_IMPORT = _umask_at_import()


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (read now where possible)."""
    umask = _read_umask()
    return 0o666 & ~(UMASK_AT_IMPORT if umask is None else umask)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: after symlinks, and hard links too where both exist."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11's resolve)
        return False


@contextmanager
def atomic_path(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    The file gets the mode of any new file (``0o666`` less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    check_output_path(path, overwrite=overwrite)
    folder = path.parent if str(path.parent) else Path(".")
    # nibabel picks the format from the temporary name's suffix, in lower case only (x.NII.GZ)
    suffix = image_suffix(path.name) or path.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=f".part{suffix}", dir=folder
        )
    except OSError as exc:
        raise OutputError(f"{folder}: output folder is not writable ({os_reason(exc)})") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: appeared while writing (use --overwrite to replace it)")
        # after the writer, which may have made the file anew (safetensors does, as 0600)
        with suppress(OSError):  # a file system without POSIX modes keeps what it gave
            os.chmod(tmp, new_file_mode())
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
    """Write a NIfTI with the given geometry, atomically; data are stored as ``dtype``.

    ``header`` is the input's: its qform and sform (and their codes) are kept, moved onto the
    output's grid when that differs (see :func:`carry_transforms`). Spatial and time units it
    leaves undefined (an MGH input) are written as mm and seconds.
    """
    with atomic_path(Path(path), overwrite=overwrite) as tmp:
        write_volume(tmp, data, affine, header, dtype=dtype, name=Path(path))


def write_volume(
    tmp: Path,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    *,
    dtype: np.dtype | type = np.float32,
    name: Path,
) -> None:
    """:func:`save_volume`'s writing, into ``tmp``, a temporary path of :func:`atomic_path`, for
    callers that rename several files together; a failure names ``name``, the final file."""
    image = volume_image(data, affine, header, dtype=dtype)
    try:
        nib.save(image, str(tmp))
    except OSError as exc:
        raise OutputError(f"{name}: could not write ({os_reason(exc)})") from exc


def volume_image(
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    *,
    dtype: np.dtype | type = np.float32,
) -> nib.Nifti1Image:
    """The NIfTI image mrisr writes for ``data`` on ``affine``, in memory: a copy of the
    input's ``header`` with its transforms carried onto the output grid (:func:`carry_transforms`),
    millimetre units and no scaling."""
    header = header.copy() if header is not None else nib.Nifti1Header()
    array = np.asarray(data, dtype=dtype)
    if tuple(header.get_data_shape()[:3]) != array.shape[:3]:
        _forget_slice_timing(header)
    carry_transforms(header, affine, array.shape)
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    spatial, temporal = header.get_xyzt_units()
    header.set_xyzt_units(
        "mm" if spatial == "unknown" else spatial, "sec" if temporal == "unknown" else temporal
    )
    image = nib.Nifti1Image(array, header.get_best_affine(), header)
    image.header.set_slope_inter(1.0, 0.0)
    return image


def _forget_slice_timing(header: nib.Nifti1Header) -> None:
    """Slice order and timing describe the input's acquisition grid: on another grid they
    would name slices that do not exist (slice_end 49 of 100 slices)."""
    for field in ("slice_start", "slice_end", "slice_code", "slice_duration"):
        header[field] = 0
    freq, phase, _ = header.get_dim_info()
    header.set_dim_info(freq, phase, None)


def carry_transforms(header: nib.Nifti1Header, affine: np.ndarray, shape: tuple[int, ...]) -> None:
    """Set ``header``'s qform and sform for an output of ``shape`` whose voxel-to-world affine
    (in the space of the header's best transform, the one mrisr reads) is ``affine``.

    On the header's own grid both transforms and their codes stay as they are: an input whose
    qform (scanner) and sform (e.g. MNI, code 4) differ keeps both, and a code 0 stays 0. On
    another grid of the same space (a true low-resolution input written on the finer grid, or
    its low-resolution version written by ``mrisr degrade``) the same voxel-to-voxel change,
    ``inv(best) @ affine``, is applied to both transforms, codes kept. A header with neither
    transform gets ``affine`` as both, code 1 (scanner), as mrisr always wrote it.
    """
    affine = np.asarray(affine, dtype=np.float64)
    qcode = int(header["qform_code"])
    scode = int(header["sform_code"])
    if not qcode and not scode:
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
        return
    best = header.get_best_affine()
    same_shape = tuple(header.get_data_shape()[:3]) == tuple(shape[:3])
    if same_shape and np.allclose(affine, best, rtol=0.0, atol=1e-5):
        return
    change = np.linalg.inv(best) @ affine  # output voxel -> input voxel
    if scode:  # the sform is the best transform: it becomes ``affine`` itself
        header.set_sform(affine, code=scode)
        # a code-0 qform is not read; set it all the same so that pixdim holds the new zooms
        qform = header.get_qform() @ change if qcode else affine
        header.set_qform(qform, code=qcode)
    else:  # the qform is the best transform; the sform (code 0) is not read
        header.set_qform(affine, code=qcode)
