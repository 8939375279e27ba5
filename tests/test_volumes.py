"""Reading and writing volumes: file modes, unusable headers, qform/sform, units, bad files."""

from __future__ import annotations

import gzip
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import head_phantom, tiny_weights, write_nifti
from typer.testing import CliRunner

from mrisr_cli.cli import app
from mrisr_cli.errors import InputError
from mrisr_cli.volumes import atomic_path, load_volume, read_geometry, same_file, save_volume

SHAPE = (20, 18, 22)
# scanner qform with a flip and a shift; an MNI-like sform that differs from it
SCANNER = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, -12], [0, 0, 1.0, 8], [0, 0, 0, 1]])
MNI = np.array([[1.0, 0, 0, -9], [0, 1.0, 0, -11], [0, 0, 1.0, -10], [0, 0, 0, 1]])


def one_line_error(result: object, needle: str) -> str:
    assert result.exit_code == 1  # type: ignore[attr-defined]
    lines = result.stderr.rstrip("\n").splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("mrisr: error:"), result.stderr  # type: ignore[attr-defined]
    assert needle in lines[0], lines[0]
    return lines[0]


# --- file modes ---------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_get_the_mode_of_a_new_file_not_0600(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    save_volume(tmp_path / "v.nii.gz", head_phantom(SHAPE), np.eye(4))
    assert mode(tmp_path / "v.nii.gz") == expected
    with atomic_path(tmp_path / "side.json", overwrite=False) as tmp:
        tmp.write_text("{}\n")
    assert mode(tmp_path / "side.json") == expected
    tiny_weights(tmp_path / "w.safetensors", seed=0)  # the real weights I/O
    assert mode(tmp_path / "w.safetensors") == expected
    # what open() gives a new file in the same folder, for comparison
    (tmp_path / "plain.txt").write_text("x")
    assert mode(tmp_path / "plain.txt") == expected


# --- unusable geometry ------------------------------------------------------------------------


def nifti_with_fields(path: Path, **fields: object) -> Path:
    """An uncompressed NIfTI whose header fields are then overwritten as given, unchecked (as a
    broken writer would leave them: nibabel refuses to write most of these itself)."""
    write_nifti(path, head_phantom(SHAPE))
    with path.open("rb") as handle:
        header = nib.Nifti1Header.from_fileobj(handle, check=False)  # vox_offset as written
    for name, value in fields.items():
        header[name] = value
    with path.open("r+b") as handle:
        handle.write(header.binaryblock)
    return path


def srow(affine: np.ndarray) -> dict[str, object]:
    return {
        "srow_x": affine[0],
        "srow_y": affine[1],
        "srow_z": affine[2],
        "sform_code": 1,
        "qform_code": 0,
    }


def zero_column() -> np.ndarray:
    affine = np.eye(4)
    affine[:, 1] = 0.0
    return affine


def with_value(value: float) -> np.ndarray:
    affine = np.eye(4)
    affine[0, 0] = value
    return affine


def parallel_columns() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 2] = affine[:3, 0]
    return affine


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (srow(zero_column()), "voxel sizes of 1 x 0 x 1 mm"),
        (srow(with_value(np.nan)), "NaN or infinite"),
        (srow(with_value(np.inf)), "NaN or infinite"),
        (srow(parallel_columns()), "not invertible"),
        ({"sform_code": 0, "qform_code": 1, "pixdim": [1, 1, 0, 1, 1, 1, 1, 1]}, "voxel size of 0"),
    ],
    ids=["zero-column", "nan", "inf", "parallel-axes", "zero-pixdim"],
)
def test_degenerate_geometry_is_one_input_error_without_warnings(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], fields: dict[str, object], needle: str
) -> None:
    path = nifti_with_fields(tmp_path / "bad.nii", **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning on the way fails the test
        with pytest.raises(InputError, match=needle) as caught:
            load_volume(path)
    assert len(str(caught.value).splitlines()) == 1
    assert capfd.readouterr().err == ""  # nibabel's header-repair log line is not printed either
    result = CliRunner().invoke(app, ["degrade", str(path), str(tmp_path / "lr.nii.gz")])
    one_line_error(result, needle)
    assert capfd.readouterr().err == ""


def test_zero_pixdim_under_a_valid_sform_is_read(tmp_path: Path) -> None:
    fields = {**srow(np.diag([1.0, 2.0, 1.0, 1.0])), "pixdim": [1, 1, 0, 1, 1, 1, 1, 1]}
    volume = load_volume(nifti_with_fields(tmp_path / "ok.nii", **fields))
    np.testing.assert_allclose(volume.spacing, (1.0, 2.0, 1.0))


# --- qform, sform and units -------------------------------------------------------------------


def nifti_with_transforms(
    path: Path, qform: np.ndarray | None, qcode: int, sform: np.ndarray | None, scode: int
) -> Path:
    image = nib.Nifti1Image(head_phantom(SHAPE), np.eye(4))
    image.set_qform(qform, code=qcode)
    image.set_sform(sform, code=scode)
    nib.save(image, path)
    return path


def transforms(path: Path) -> tuple[np.ndarray | None, int, np.ndarray | None, int]:
    header = nib.load(path).header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    return qform, int(qcode), sform, int(scode)


def assert_same_transforms(got: Path, expected: Path) -> None:
    for a, b in zip(transforms(got), transforms(expected), strict=True):
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            np.testing.assert_allclose(a, b, atol=1e-5)  # type: ignore[arg-type]
        else:
            assert a == b


@pytest.mark.parametrize(
    ("qform", "qcode", "sform", "scode"),
    [(SCANNER, 1, MNI, 4), (None, 0, MNI, 2), (SCANNER, 1, None, 0)],
    ids=["scanner-qform-mni-sform", "sform-only", "qform-only"],
)
def test_output_on_the_input_grid_keeps_qform_and_sform_with_their_codes(
    tmp_path: Path, qform: np.ndarray | None, qcode: int, sform: np.ndarray | None, scode: int
) -> None:
    src = nifti_with_transforms(tmp_path / "in.nii.gz", qform, qcode, sform, scode)
    volume = load_volume(src)
    save_volume(tmp_path / "out.nii.gz", volume.data, volume.affine, volume.header)
    assert_same_transforms(tmp_path / "out.nii.gz", src)
    # and through a command: `degrade` writes its output on the input grid
    result = CliRunner().invoke(app, ["degrade", str(src), str(tmp_path / "lr.nii.gz")])
    assert result.exit_code == 0, result.output
    assert_same_transforms(tmp_path / "lr.nii.gz", src)


def test_output_on_another_grid_moves_both_transforms_by_the_same_voxel_change(
    tmp_path: Path,
) -> None:
    src = nifti_with_transforms(tmp_path / "in.nii.gz", SCANNER, 1, MNI, 4)
    volume = load_volume(src)
    # a 2 mm grid along axis 0, in the input's axis order, first voxel shared
    change = np.diag([2.0, 1.0, 1.0, 1.0])
    half = volume.data[::2]
    save_volume(tmp_path / "out.nii.gz", half, volume.affine @ change, volume.header)
    qform, qcode, sform, scode = transforms(tmp_path / "out.nii.gz")
    assert (qcode, scode) == (1, 4)
    np.testing.assert_allclose(sform, MNI @ change, atol=1e-5)  # type: ignore[arg-type]
    np.testing.assert_allclose(qform, SCANNER @ change, atol=1e-5)  # type: ignore[arg-type]
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").header.get_zooms(), (2, 1, 1))


def test_header_without_transforms_gets_the_affine_as_scanner_transform(tmp_path: Path) -> None:
    src = nifti_with_transforms(tmp_path / "in.nii.gz", None, 0, None, 0)
    volume = load_volume(src)
    save_volume(tmp_path / "out.nii.gz", volume.data, volume.affine, volume.header)
    qform, qcode, sform, scode = transforms(tmp_path / "out.nii.gz")
    assert (qcode, scode) == (1, 1)
    np.testing.assert_allclose(sform, volume.affine)  # type: ignore[arg-type]
    np.testing.assert_allclose(qform, volume.affine)  # type: ignore[arg-type]


def test_mgz_input_gives_output_in_mm_and_seconds(tmp_path: Path) -> None:
    lia = np.array([[-1.0, 0, 0, 10], [0, 0, 1.0, -12], [0, -1.0, 0, 8], [0, 0, 0, 1]])
    src = tmp_path / "in.mgz"
    nib.save(nib.MGHImage(head_phantom(SHAPE), lia), src)
    result = CliRunner().invoke(app, ["degrade", str(src), str(tmp_path / "lr.nii.gz")])
    assert result.exit_code == 0, result.output
    out = nib.load(tmp_path / "lr.nii.gz")
    assert out.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(out.affine, lia)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1


def test_defined_units_are_kept(tmp_path: Path) -> None:
    image = nib.Nifti1Image(head_phantom(SHAPE), np.eye(4))
    image.header.set_xyzt_units("micron", "msec")
    nib.save(image, tmp_path / "in.nii.gz")
    volume = load_volume(tmp_path / "in.nii.gz")
    save_volume(tmp_path / "out.nii.gz", volume.data, volume.affine, volume.header)
    assert nib.load(tmp_path / "out.nii.gz").header.get_xyzt_units() == ("micron", "msec")


# --- files that are not whole images ------------------------------------------------------------


def cut(source: Path, target: Path, keep: int) -> Path:
    target.write_bytes(source.read_bytes()[:keep])
    return target


def good(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"good_{name}"
    if name.endswith((".mgz", ".mgh")):
        nib.save(nib.MGHImage(head_phantom(SHAPE), np.eye(4)), path)
    else:
        write_nifti(path, head_phantom(SHAPE))
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".mgz", ".nii", ".mgh"])
@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_files_are_reported_as_truncated(tmp_path: Path, suffix: str, where: str) -> None:
    whole = good(tmp_path, f"v{suffix}")
    keep = whole.stat().st_size // 2 if where == "data" else 100
    path = cut(whole, tmp_path / f"cut{suffix}", keep)
    with pytest.raises(InputError) as caught:
        load_volume(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: file is truncated or corrupt (truncated: "), message
    assert len(message.splitlines()) == 1 and message.count(str(path)) == 1


def test_whole_gzip_of_a_cut_file_is_reported_as_truncated(tmp_path: Path) -> None:
    raw = good(tmp_path, "v.nii").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(raw[:300]))  # the stream is whole, its header is not
    with pytest.raises(InputError, match=r"\(truncated: 300 bytes end inside the header\)"):
        load_volume(path)
    path.write_bytes(gzip.compress(raw[:5000]))
    with pytest.raises(InputError, match=r"\(truncated: \d+ of \d+ bytes of image data\)"):
        load_volume(path)


def test_corrupt_gzip_is_reported_as_corrupt(tmp_path: Path) -> None:
    raw = bytearray(good(tmp_path, "v.nii.gz").read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 50] = bytes(50)  # damaged compressed data, the length unchanged
    path = tmp_path / "damaged.nii.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as caught:
        load_volume(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: file is truncated or corrupt (corrupt: "), message


@pytest.mark.parametrize("suffix", [".nii.gz", ".mgz"])
def test_gzip_checksum_failure_is_reported_as_corrupt(tmp_path: Path, suffix: str) -> None:
    """nibabel stops reading before the gzip trailer, so a damaged stream can decode without an
    error; here the stored CRC-32 is wrong, which every gzip reader treats as corruption."""
    raw = bytearray(good(tmp_path, f"v{suffix}").read_bytes())
    raw[-6] ^= 0xFF  # a byte of the CRC-32 in the 8-byte trailer
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as caught:
        load_volume(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: file is truncated or corrupt (corrupt: "), message
    assert "CRC" in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("suffix", [".nii", ".mgh"])
def test_gzip_stream_cut_after_the_voxels_is_reported_as_truncated(
    tmp_path: Path, suffix: str
) -> None:
    """A download cut in the last bytes: every voxel decodes (nibabel reads them all without an
    error), the end-of-stream marker and checksum are missing."""
    whole = good(tmp_path, f"v{suffix}").read_bytes()
    path = tmp_path / f"cut{suffix}.gz".replace(".mgh.gz", ".mgz")
    path.write_bytes(gzip.compress(whole)[:-8])  # the 8-byte trailer lost
    with pytest.raises(InputError, match=r"\(truncated: the compressed data end before"):
        load_volume(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mgz"])
def test_file_named_gz_but_not_gzip_reads_naturally(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"plain{suffix}"
    path.write_text("hello, this is not an image\n" * 20)
    with pytest.raises(InputError) as caught:
        load_volume(path)
    message = str(caught.value)
    gz = suffix.replace(".nii", "")
    assert message == f"{path}: not a NIfTI/MGH image (named {gz} but not gzip-compressed)"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a NIfTI/MGH image (the file is empty)"),
        (b"hello, this is not an image\n" * 20, "not a NIfTI/MGH image (the contents are not"),
    ],
    ids=["empty", "text"],
)
def test_files_that_are_not_images(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "text.nii"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        load_volume(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert '"it"' not in message and "'it'" not in message


def test_gzip_of_something_else_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"hello, this is not an image\n" * 20))
    with pytest.raises(InputError, match="not a NIfTI/MGH image"):
        load_volume(path)


@pytest.mark.parametrize("name", ["Sub.Nii.Gz", "sub.nIi", "sub.Mgz", "sub.NII.GZ"])
def test_suffixes_in_mixed_case_are_read(tmp_path: Path, name: str) -> None:
    """nibabel looks for ``a.Nii.Gz`` as ``a.nii.Gz``; mrisr reads it (and writes it) anyway."""
    data = head_phantom((12, 10, 14))
    lower = tmp_path / name.lower()
    save_volume(lower, data, np.diag([1.0, 1.2, 0.9, 1.0]), nib.Nifti1Header())
    lower.rename(tmp_path / name)
    volume = load_volume(tmp_path / name)
    np.testing.assert_allclose(volume.data, data, rtol=1e-6)
    np.testing.assert_allclose(volume.spacing, (1.0, 1.2, 0.9))
    save_volume(tmp_path / f"out-{name}", volume.data, volume.affine, volume.header)
    np.testing.assert_allclose(load_volume(tmp_path / f"out-{name}").data, data, rtol=1e-6)


def test_a_damaged_file_in_mixed_case_is_still_reported_as_damaged(tmp_path: Path) -> None:
    path = tmp_path / "cut.Nii.Gz"
    whole = gzip.compress(nib.Nifti1Image(head_phantom((12, 10, 14)), np.eye(4)).to_bytes())
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_volume(path)


def test_values_beyond_float32_are_an_input_error_without_a_numpy_warning(tmp_path: Path) -> None:
    """What a gzip stream damaged in the middle can decode to: numpy's cast warning used to be
    printed above the error line."""
    data = head_phantom((12, 10, 14)).astype(np.float64)
    data[3, 3, 3] = 1e300
    path = write_nifti(tmp_path / "huge.nii.gz", data, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="NaN or infinite"):
            load_volume(path)


def test_a_gzip_image_named_nii_is_told_to_be_renamed(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii"
    path.write_bytes(gzip.compress(nib.Nifti1Image(head_phantom((8, 8, 8)), np.eye(4)).to_bytes()))
    with pytest.raises(InputError) as caught:
        load_volume(path)
    assert (
        str(caught.value) == f"{path}: gzip-compressed, but not named .nii.gz or .mgz (rename it)"
    )


def test_read_geometry_reads_the_header_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """prepare's rerun reads a scan's header alone; nibabel's repairs (zero pixdim here), which
    it logs to stderr, are kept quiet, as load_volume keeps them."""
    image = nib.Nifti1Image(head_phantom(SHAPE), MNI)
    image.header["pixdim"][1:4] = 0
    image.header.set_sform(MNI, code=2)
    image.to_filename(tmp_path / "pixdim0.nii.gz")
    with caplog.at_level(logging.INFO, logger="nibabel.global"):
        nib.load(tmp_path / "pixdim0.nii.gz")  # what nibabel says on its own
        assert any("pixdim" in r.getMessage() for r in caplog.records)
        caplog.clear()
        shape, affine = read_geometry(tmp_path / "pixdim0.nii.gz")
    assert shape == SHAPE and np.allclose(affine, MNI)
    assert caplog.records == []
    (tmp_path / "notes.nii.gz").write_text("not an image")
    with pytest.raises(InputError, match=r"notes\.nii\.gz"):
        read_geometry(tmp_path / "notes.nii.gz")


def test_same_file_through_links_and_not_through_a_loop(tmp_path: Path) -> None:
    target = write_nifti(tmp_path / "a.nii.gz", head_phantom(SHAPE))
    (tmp_path / "link.nii.gz").symlink_to(target)
    os.link(target, tmp_path / "hard.nii.gz")
    assert same_file(tmp_path / "link.nii.gz", target)
    assert same_file(tmp_path / "hard.nii.gz", target)
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert not same_file(tmp_path / "loop1", target)  # Python 3.11's resolve raised here
    assert not same_file(tmp_path / "b.nii.gz", target)


def test_colour_and_complex_images_are_refused_in_one_line(tmp_path: Path) -> None:
    """An RGB image crashed the read (a batch stopped with an internal error); a complex one
    was silently cut to its real part."""
    rgb = np.zeros((12, 10, 14), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    phase = np.exp(1j * np.linspace(0, 3, 12 * 10 * 14)).reshape(12, 10, 14)
    complex_data = (head_phantom((12, 10, 14)) * phase).astype(np.complex64)
    nib.save(nib.Nifti1Image(complex_data, np.eye(4)), tmp_path / "complex.nii.gz")
    for name, needle in (("rgb", "colour (RGB) voxels"), ("complex", "complex-valued voxels")):
        out = tmp_path / f"{name}_out.nii.gz"
        result = CliRunner().invoke(app, ["upsample", str(tmp_path / f"{name}.nii.gz"), str(out)])
        one_line_error(result, needle)
        assert not out.exists()


def test_a_nifti2_input_is_written_as_nifti1_without_nibabel_chatter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = head_phantom((12, 10, 14))
    image = nib.Nifti2Image(data, MNI)
    image.header.set_qform(SCANNER, code=1)
    image.header.set_sform(MNI, code=4)
    nib.save(image, tmp_path / "in.nii.gz")
    volume = load_volume(tmp_path / "in.nii.gz")
    with caplog.at_level(logging.DEBUG, logger="nibabel"):
        save_volume(tmp_path / "out.nii.gz", volume.data, volume.affine, volume.header)
    assert not caplog.records  # nibabel logs to stderr: "sizeof_hdr should be 348"
    written = nib.load(tmp_path / "out.nii.gz")
    assert type(written.header) is nib.Nifti1Header
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 4)
    np.testing.assert_allclose(written.header.get_sform(), MNI)
    np.testing.assert_allclose(written.header.get_qform(), SCANNER)
    np.testing.assert_array_equal(np.asarray(written.dataobj), data)


def test_slice_timing_of_the_input_grid_is_not_carried_onto_another(tmp_path: Path) -> None:
    image = nib.Nifti1Image(head_phantom(SHAPE), SCANNER)
    image.header.set_dim_info(freq=0, phase=1, slice=2)
    image.header["slice_end"], image.header["slice_code"] = SHAPE[2] - 1, 1
    image.header.set_slice_duration(0.05)
    nib.save(image, tmp_path / "in.nii.gz")
    volume = load_volume(tmp_path / "in.nii.gz")
    save_volume(tmp_path / "same.nii.gz", volume.data, volume.affine, volume.header)
    finer = np.repeat(volume.data, 2, axis=2)
    save_volume(tmp_path / "finer.nii.gz", finer, volume.affine @ np.diag([1, 1, 0.5, 1]),
                volume.header)  # fmt: skip
    same, other = (nib.load(tmp_path / f"{n}.nii.gz").header for n in ("same", "finer"))
    assert same.get_dim_info() == (0, 1, 2) and int(same["slice_end"]) == SHAPE[2] - 1
    assert other.get_dim_info() == (0, 1, None)
    assert int(other["slice_end"]) == int(other["slice_code"]) == 0
