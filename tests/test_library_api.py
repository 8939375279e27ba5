"""mrisr as a Python library: threads, in-memory images, str paths, bad arrays and options,
metrics' inputs, and the caller's global state (matplotlib's backend, torch's random stream)."""

from __future__ import annotations

import copy
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import NO_N4, TINY_FAST, TINY_RRDG, head_phantom, tiny_weights, write_nifti
from torch import nn

from mrisr_cli import fusion, metrics
from mrisr_cli.degradation import degrade_volume, lowres_volume
from mrisr_cli.degrade_file import degrade_file
from mrisr_cli.errors import DeviceError, InputError, MrisrError, MrisrWarning
from mrisr_cli.inference import (
    InferenceOptions,
    prepare_network,
    resolve_device,
    super_resolve,
)
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.pipeline import (
    Generator,
    UpsampleOptions,
    load_generator_files,
    upsample_array,
    upsample_file,
    upsample_image,
)

PATCH = (16, 12, 16)  # small tiles: these tests are about the API, not about speed
OPTIONS = InferenceOptions(patch=PATCH)
SHAPE = (24, 20, 26)
# voxel axes L, I, A (not RAS+), the third 2 mm: reoriented, resampled, and permuted (canonical
# axis 1 is coarse, the model sharpens axes 0 and 2)
LIA_2MM = np.array([[-1.0, 0, 0, 20], [0, 0, 2.0, -15], [0, -1.0, 0, 30], [0, 0, 0, 1]])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # restored by conftest's fixture


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# --- 1. threads -----------------------------------------------------------------------------


class _ConvBN(nn.Module):
    """Not one of mrisr's generators: its folding is found by torch.fx's trace. Its forward is
    slow (a sleep per layer), so that tracing and running it take a while, as a real network's
    do: long enough for another thread to run while it is traced."""

    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        self.first = nn.Conv3d(1, 2, 1)
        self.convs = nn.ModuleList(nn.Conv3d(2, 2, 1) for _ in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm3d(2) for _ in range(depth))
        self.last = nn.Conv3d(2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            time.sleep(0.001)
            y = y + torch.relu(norm(conv(y)))
        return self.last(y) + x


def _fresh_model(kind: str, files: object) -> nn.Module:
    if kind == "rrdg":
        return files.generator(1.0, "cpu").model  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = _ConvBN().eval()
    for norm in model.norms:
        norm.running_mean.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("kind", ["rrdg", "traced"])
def test_two_threads_on_a_fresh_generator_give_the_serial_output(tmp_path: Path, kind: str) -> None:
    """First uses of one generator in two threads at once: each prepares (folds) the network
    while the other may be running it, which torch.fx's process-wide patching broke."""
    files = load_generator_files(tiny_weights(tmp_path / "w.safetensors", 1, TINY_RRDG), None)
    weights = files.generator(1.0, "cpu").weights
    data = head_phantom(SHAPE)
    serial_generator = Generator(_fresh_model(kind, files), weights, 1.0)
    serial = upsample_array(data, serial_generator, options=OPTIONS)
    for _ in range(3):  # the unguarded code failed every time
        outputs = _in_two_threads(data, Generator(_fresh_model(kind, files), weights, 1.0))
        for out in outputs:
            np.testing.assert_array_equal(out, serial)


def _in_two_threads(data: np.ndarray, generator: Generator) -> list[np.ndarray]:
    """``upsample_array`` in two threads that start together; an error in either is raised."""
    barrier = threading.Barrier(2)
    outputs: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            outputs.append(upsample_array(data, generator, options=OPTIONS))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return outputs


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("rrdg", {"features": 4, "blocks": 0, "growth": 2}),
        ("rrdg", {"features": 4, "blocks": 2, "growth": 2}),
        ("srresnet", {"features": 4, "blocks": 0, "outer_kernel": 3}),
        ("srresnet", {"features": 4, "blocks": 3, "outer_kernel": 3}),
        ("mdcsrn", {"growth": 2, "blocks": 2, "units": 2}),
        ("fsrcnn", {"d": 4, "s": 2, "m": 1}),
        ("rrdg", {}),  # the paper's sizes
    ],
)
def test_generators_fold_the_traced_pairs_without_tracing(
    name: str, params: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_network(NetworkConfig(name, params))
    traced = fusion.traced_conv_bn_pairs(model)

    def no_trace(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("traced")

    monkeypatch.setattr(torch.fx, "symbolic_trace", no_trace)
    assert fusion.conv_bn_pairs(model) == traced
    assert fusion.conv_bn_pairs(_ConvBN()) == []  # others are still traced (here: refused)


# --- 2. in-memory images --------------------------------------------------------------------


def test_upsample_image_is_what_upsample_file_writes(tmp_path: Path, fast_weights: Path) -> None:
    """A non-RAS input with a 2 mm axis: reoriented, resampled, permuted and back, in memory."""
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom(SHAPE), LIA_2MM, np.int16)
    generator = load_generator_files(fast_weights, None).generator(1.0, "cpu")
    options = UpsampleOptions(inference=OPTIONS)
    upsample_file(src, tmp_path / "out.nii.gz", generator, options)
    written = nib.load(tmp_path / "out.nii.gz")
    image = upsample_image(nib.load(src), generator, options)
    assert isinstance(image, nib.Nifti1Image)
    assert image.shape == written.shape == (24, 20, 52)
    np.testing.assert_array_equal(np.asarray(image.dataobj), written.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(image.affine, written.affine)
    for key in ("qform_code", "sform_code", "pixdim", "xyzt_units", "datatype", "dim_info"):
        np.testing.assert_array_equal(image.header[key], written.header[key], err_msg=key)


def test_upsample_image_reports_what_upsample_file_warns_about(
    tmp_path: Path, fast_weights: Path
) -> None:
    """The result's warnings of upsample_file (here voxels finer than the model's 1 mm) reach a
    library caller: through ``warn`` where given, else as a MrisrWarning."""
    fine = np.diag([0.7, 0.7, 0.7, 1.0])
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom(SHAPE), fine, np.int16)
    generator = load_generator_files(fast_weights, None).generator(1.0, "cpu")
    options = UpsampleOptions(inference=OPTIONS)
    expected = upsample_file(src, tmp_path / "out.nii.gz", generator, options).warnings
    assert any("finer than the 1 mm" in w for w in expected), expected
    seen: list[str] = []
    upsample_image(nib.load(src), generator, options, warn=seen.append)
    assert seen == expected
    with pytest.warns(MrisrWarning) as caught:
        upsample_image(nib.load(src), generator, options)
    assert [str(w.message) for w in caught] == expected


def test_upsample_image_checks_an_image_made_in_memory(fast_weights: Path) -> None:
    generator = load_generator_files(fast_weights, None).generator(1.0, "cpu")
    flat = nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4))
    with pytest.raises(InputError) as exc:
        upsample_image(flat, generator)
    assert one_line(exc) == "image: volume is empty (every voxel is 0)"
    with pytest.raises(InputError, match=r"^image: expected a 3D volume"):
        upsample_image(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), generator)


# --- 3. str paths -----------------------------------------------------------------------------


def test_str_paths_are_taken(tmp_path: Path, fast_weights: Path) -> None:
    src = write_nifti(tmp_path / "in.nii.gz", head_phantom(SHAPE))
    generator = load_generator_files(fast_weights, None).generator(1.0, "cpu")
    result = upsample_file(
        str(src), str(tmp_path / "out.nii.gz"), generator, UpsampleOptions(inference=OPTIONS)
    )
    assert result.output == tmp_path / "out.nii.gz" and (tmp_path / "out.json").is_file()
    lr, low = str(tmp_path / "lr.nii.gz"), str(tmp_path / "low.nii.gz")
    assert degrade_file(str(src), lr, NO_N4, lowres_path=low) == []
    assert nib.load(lr).shape == SHAPE and nib.load(low).shape == (12, 20, 13)


# --- 4. bad arrays ----------------------------------------------------------------------------


def _volume(seed: int = 0) -> np.ndarray:
    return head_phantom(SHAPE, seed)


def _nan() -> np.ndarray:
    data = _volume()
    data[3, 4, 5] = np.nan
    return data


def _inf() -> np.ndarray:
    data = _volume()
    data[3, 4, 5] = -np.inf
    return data


BAD_ARRAYS = {
    "nan": (_nan, "1 NaN or infinite voxels; fix or mask them first"),
    "inf": (_inf, "1 NaN or infinite voxels; fix or mask them first"),
    "bool": (lambda: _volume() > 0, "a boolean array (a mask), not the grey values of a T1"),
    "2d": (lambda: _volume()[:, :, 0], "expected a 3D volume, got an array of shape (24, 20)"),
    "4d": (
        lambda: np.stack([_volume(), _volume()], axis=-1),
        "expected a 3D volume, got an array of shape (24, 20, 26, 2)",
    ),
    "zeros": (lambda: np.zeros(SHAPE, np.float32), "volume is empty (every voxel is 0)"),
    "thin": (lambda: _volume()[:, :1], "volume of shape (24, 1, 26) is too thin to be a 3D scan"),
}


@pytest.fixture(scope="module")
def fast_generator(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    path = tiny_weights(tmp_path_factory.mktemp("w") / "fast.safetensors", 4, TINY_FAST)
    return load_generator_files(path, None).generator(1.0, "cpu")


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
@pytest.mark.parametrize("entry", ["upsample_array", "super_resolve", "degrade_volume"])
def test_bad_arrays_are_one_input_error(case: str, entry: str, fast_generator: Generator) -> None:
    make, expected = BAD_ARRAYS[case]
    run = {
        "upsample_array": lambda a: upsample_array(a, fast_generator, options=OPTIONS),
        "super_resolve": lambda a: super_resolve(a, fast_generator.model, OPTIONS),
        "degrade_volume": degrade_volume,
    }[entry]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way
        with pytest.raises(InputError) as exc:
            run(make())
    assert one_line(exc).startswith(f"{entry}: ") and expected in str(exc.value)


def test_nan_into_lowres_volume_is_refused() -> None:
    with pytest.raises(InputError, match=r"^lowres_volume: 1 NaN"):
        lowres_volume(_nan(), NO_N4)


def test_float16_ints_and_a_singleton_fourth_axis_are_taken(fast_generator: Generator) -> None:
    data = np.round(_volume())  # 0..116: exact in float16 and int16
    expected = upsample_array(data, fast_generator, options=OPTIONS)
    for same in (data.astype(np.float16), data.astype(np.int16), data[..., None]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = upsample_array(same, fast_generator, options=OPTIONS)
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(degrade_volume(data[..., None]), degrade_volume(data))


# --- 5. options and devices -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"margin": -1}, "InferenceOptions: margin must be a whole number >= 0, got -1"),
        (
            {"patch": (6, 6, 6)},
            "InferenceOptions: patch (6, 6, 6) leaves no core after cropping margin 3 per face",
        ),
        ({"patch": (64, 40)}, "InferenceOptions: patch must be three whole numbers >= 1"),
        ({"patch": (64, 40, 0)}, "InferenceOptions: patch must be three whole numbers >= 1"),
        ({"batch_size": 0}, "InferenceOptions: batch_size must be a whole number >= 1, got 0"),
        (
            {"overlap": 34},
            "InferenceOptions: overlap 34 must be below the patch core (34 voxels)",
        ),
        ({"device": "gpu"}, "unknown device 'gpu' (use auto, cpu, cuda or cuda:N)"),
    ],
)
def test_bad_inference_options_are_one_line(kwargs: dict, expected: str) -> None:
    with pytest.raises(MrisrError) as exc:
        InferenceOptions(**kwargs)
    assert one_line(exc).startswith(expected)


def test_numpy_integers_become_ints() -> None:
    options = InferenceOptions(patch=tuple(np.array([24, 16, 24])), margin=np.int64(2))
    assert options.patch == (24, 16, 24) and type(options.margin) is int


def test_auto_device_runs(fast_generator: Generator) -> None:
    data = _volume()
    auto = InferenceOptions(patch=PATCH, device="auto")
    out = upsample_array(data, fast_generator, options=auto)
    if resolve_device("auto") == "cpu":
        np.testing.assert_array_equal(out, upsample_array(data, fast_generator, options=OPTIONS))


def test_default_options_run_where_the_model_is(fast_generator: Generator) -> None:
    """InferenceOptions() names no device: the network runs where the model's weights are (a
    model moved to a GPU is not copied back to the CPU); "auto" is the CLI's choice."""
    assert InferenceOptions().device is None
    net = prepare_network(fast_generator.model, InferenceOptions(patch=PATCH))
    assert next(net.parameters()).device == torch.device("cpu")
    auto = prepare_network(fast_generator.model, InferenceOptions(patch=PATCH, device="auto"))
    assert next(auto.parameters()).device == torch.device(resolve_device("auto"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_the_gpu_runs_there_by_default(fast_generator: Generator) -> None:
    model = copy.deepcopy(fast_generator.model).cuda()
    assert next(prepare_network(model, InferenceOptions()).parameters()).is_cuda
    out = super_resolve(_volume(), model, InferenceOptions(patch=PATCH))
    cpu = super_resolve(_volume(), fast_generator.model, replace(OPTIONS, device="cpu"))
    assert float(np.abs(out - cpu).max()) < 1e-3 * float(np.ptp(cpu))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_the_cli_device_error(
    fast_weights: Path, fast_generator: Generator
) -> None:
    cli_line = "--device cuda was asked for, but no CUDA GPU is available"
    with pytest.raises(DeviceError) as exc:
        load_generator_files(fast_weights, None).generator(1.0, "cuda")
    assert one_line(exc) == cli_line
    with pytest.raises(DeviceError) as exc:
        upsample_array(_volume(), fast_generator, options=InferenceOptions(device="cuda"))
    assert one_line(exc) == cli_line


# --- 6. metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric", [metrics.psnr, metrics.ssim, metrics.nrmse, metrics.high_frequency]
)
def test_metrics_refuse_non_finite_volumes(metric: object) -> None:
    ref = _volume() / 2
    with pytest.raises(InputError) as exc:
        metric(ref, _nan())  # type: ignore[operator]
    assert one_line(exc) == "the prediction holds 1 NaN or infinite voxels"
    with pytest.raises(InputError, match=r"^the reference holds 1 NaN"):
        metric(_inf(), ref)  # type: ignore[operator]


def test_image_metrics_still_scores_non_finite_volumes_as_nan() -> None:
    """Evaluation and training's validation record a diverged model's scores, as before."""
    scores = metrics.image_metrics(_volume(), _nan(), _volume() > 0)  # the NaN is in the air
    assert np.isnan([scores.psnr, scores.ssim, scores.nrmse]).all(), scores


# --- 7. the caller's global state -------------------------------------------------------------


def test_demo_png_leaves_matplotlib_alone(tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    from mrisr_cli.demo import save_slices_png

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figures = plt.get_fignums()
        save_slices_png(tmp_path / "d.png", {"a": _volume(), "b": _volume(1)}, overwrite=False)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
    finally:
        matplotlib.use(before)
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG")


def test_loading_a_generator_leaves_the_callers_random_stream(fast_weights: Path) -> None:
    files = load_generator_files(fast_weights, None)
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    files.generator(1.0, "cpu")
    files.psnr.build()  # type: ignore[union-attr]
    assert torch.equal(torch.rand(3), expected)


# --- README's "From Python" ---------------------------------------------------------------------


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snippet README shows, run as written (tiny weights in $MRISR_WEIGHTS): it must not
    rot as the API changes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### From Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    weights = tmp_path / "weights"
    weights.mkdir()
    tiny_weights(weights / "rrdg_psnr.safetensors", seed=1)
    tiny_weights(weights / "rrdg_gan.safetensors", seed=2)
    monkeypatch.setenv("MRISR_WEIGHTS", str(weights))
    monkeypatch.chdir(tmp_path)
    write_nifti(tmp_path / "sub-01_T1w.nii.gz", head_phantom((24, 20, 26)), LIA_2MM)
    exec(compile(code, "README.md", "exec"), {})
    written = nib.load(str(tmp_path / "sub-01_sr.nii.gz"))
    assert len(written.shape) == 3 and np.allclose(written.header.get_zooms(), 1.0)
    assert np.isfinite(np.asarray(written.dataobj)).all()
