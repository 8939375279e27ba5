"""Running a generator over a whole (normalised) volume, patch batch by patch batch.

What runs, and what the output is, tile by tile (every tile of the paper's grid, in order):

1. A patch whose padded input is one constant value (the exact-zero background of skull-stripped
   scans) gives the same output as any other such patch: it is run once and reused. Identical to
   running every patch.
2. A patch that is not constant but whose input holds no 2x2x2 cube with a mean above the
   *background threshold* (a tenth of the way from the volume's minimum to its Otsu threshold:
   air and its noise) is not run: its core keeps the input values. Background passes through
   unchanged; the head is not affected, because a patch touching one such cube is run.
3. Every other patch is run; its output is exactly that of the straightforward path (pad, run each
   patch, crop, stitch), because the grid itself does not change.

The network runs as an inference copy: BatchNorm folded into the convolutions
(:mod:`mrisr_cli.fusion`), activations channels-last (oneDNN's native layout: with the folding,
10-30% faster on the CPU, docs/speed.md), fp16 (CUDA) or bf16 (CPU) weights with ``half``
(fp32 instead on a CPU without native bf16, where bf16 is emulated and far slower). On
CUDA, batches travel through pinned buffers with asynchronous copies while the host prepares the
next batch, cuDNN picks its algorithms once per shape (``cudnn.benchmark``) and fp32 means fp32
(TF32 off).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from mrisr_cli.errors import DeviceError, MrisrError
from mrisr_cli.fusion import fold_batchnorm
from mrisr_cli.intensity import otsu_threshold
from mrisr_cli.tiling import (
    PAPER_MARGIN,
    PAPER_PATCH,
    TileGrid,
    blend_window,
    crop_core,
    empty_canvas,
    finish_canvas,
    pad_for_grid,
    tiles_with_content,
)
from mrisr_cli.volumes import checked_array

ProgressCallback = Callable[[int, int], None]
Start = tuple[int, int, int]

#: Where background ends, as a fraction of the way from the minimum to Otsu's threshold, applied
#: to the means of 2x2x2 cubes. On the 18 real 1 mm volumes of the development data this runs
#: about the tiles that "any voxel above the minimum" runs on exact-zero backgrounds, and skips
#: air with noise in whole-head scans (what is skipped is below 10% of the tissue median).
BACKGROUND_FRACTION = 0.1
CONTENT_BLOCK = 2


@dataclass(frozen=True)
class InferenceOptions:
    """How to run the network: tiling, batching, device, precision and the speed switches."""

    patch: tuple[int, int, int] = PAPER_PATCH
    margin: int = PAPER_MARGIN
    batch_size: int = 4
    #: None: where the model's weights are (a model moved to a GPU runs there); "auto" as the
    #: CLI's --device: a GPU where torch sees one
    device: str | None = None
    half: bool = False
    skip_constant: bool = True
    skip_background: bool = True
    overlap: int = 0
    fold_batchnorm: bool = True
    channels_last: bool | None = None  # None: on (faster on CPU; cuDNN's NDHWC fp16 kernels)
    compile: bool = False

    def __post_init__(self) -> None:
        """Checked here, for library callers (the CLI checks its options first, in its own
        words): a bad tiling otherwise fails deep inside numpy or the tiling code. Whether the
        device exists is checked where it is used (:func:`resolve_options`)."""
        patch = tuple(self.patch) if isinstance(self.patch, tuple | list) else ()
        if len(patch) != 3 or not all(_is_int(p) and p >= 1 for p in patch):
            raise MrisrError(
                f"InferenceOptions: patch must be three whole numbers >= 1, got {self.patch!r}"
            )
        patch = tuple(int(p) for p in patch)
        object.__setattr__(self, "patch", patch)
        for name, least in (("margin", 0), ("overlap", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < least:
                raise MrisrError(
                    f"InferenceOptions: {name} must be a whole number >= {least}, got {value!r}"
                )
            object.__setattr__(self, name, int(value))  # numpy integers: JSON in the sidecar
        core = min(patch) - 2 * self.margin
        if core < 1:
            raise MrisrError(
                f"InferenceOptions: patch {patch} leaves no core after cropping margin "
                f"{self.margin} per face"
            )
        if self.overlap >= core:
            raise MrisrError(
                f"InferenceOptions: overlap {self.overlap} must be below the patch core "
                f"({core} voxels)"
            )
        if self.device is not None and (
            not isinstance(self.device, str) or not DEVICE_NAME.fullmatch(self.device)
        ):
            raise DeviceError(f"unknown device {self.device!r} (use auto, cpu, cuda or cuda:N)")


#: The device names mrisr takes (whether the device exists is :func:`resolve_device`'s part).
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def model_device(model: nn.Module | None) -> str:
    """Where a model's weights are ("cpu" for one without any, or no model)."""
    if model is not None:
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return str(tensor.device)
    return "cpu"


def resolve_device(name: str) -> str:
    """'auto' picks CUDA when torch sees a GPU (honouring CUDA_VISIBLE_DEVICES), else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} was asked for, but no CUDA GPU is available")
        try:
            index = torch.device(name).index
        except RuntimeError:
            raise DeviceError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise DeviceError(
                f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
        return name
    if name != "cpu":
        raise DeviceError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return name


def half_dtype(device: str) -> torch.dtype:
    """The half type of a device: fp16 on CUDA, bf16 on CPU."""
    return torch.float16 if device.startswith("cuda") else torch.bfloat16


def fast_half_available(device: str) -> bool:
    """Whether half precision is faster than fp32 here: CUDA, or a CPU with native bf16.

    Without AVX512-BF16 or AMX, oneDNN emulates bf16 and is many times slower than fp32 (measured
    on AVX2 AMD EPYC: see docs/speed.md).
    """
    if device.startswith("cuda"):
        return True
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_half(device: str, half: bool) -> tuple[bool, str | None]:
    """``--half`` as it should run here, and a warning when it falls back to fp32."""
    if half and not fast_half_available(device):
        return False, (
            "--half: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is far slower "
            "than fp32; running in fp32"
        )
    return half, None


def resolve_options(
    options: InferenceOptions, model: nn.Module | None = None
) -> tuple[InferenceOptions, str | None]:
    """The options as they run here: ``half`` falls back to fp32 where :func:`resolve_half` says
    so, with its warning. :func:`super_resolve` applies this to every call, so every caller (the
    CLI, :mod:`mrisr_cli.pipeline`, the demo, library code) gets the same rule. The device is
    resolved too (:func:`resolve_device`: ``auto`` picked, a missing GPU the CLI's DeviceError;
    no device given: ``model``'s, else the CPU).
    """
    device = resolve_device(options.device or model_device(model))
    half, warning = resolve_half(device, options.half)
    if (device, half) != (options.device, options.half):
        options = replace(options, device=device, half=half)
    return options, warning


def content_blocks(volume: np.ndarray) -> np.ndarray:
    """Which :data:`CONTENT_BLOCK`-sized cubes of the volume hold more than background.

    A cube counts when its mean exceeds the background threshold: averaging 8 voxels divides
    the noise of air by ~3 while one tissue voxel in a cube is still enough to lift it.
    """
    b = CONTENT_BLOCK
    low = float(volume.min())
    shape = tuple(-(-n // b) * b for n in volume.shape)
    full = np.full(shape, low, dtype=np.float32)
    full[: volume.shape[0], : volume.shape[1], : volume.shape[2]] = volume
    n0, n1, n2 = (n // b for n in shape)
    means = full.reshape(n0, b, n1, b, n2, b).mean(axis=(1, 3, 5))
    if float(means.max()) <= low:
        return np.zeros(means.shape, dtype=bool)
    threshold = low + BACKGROUND_FRACTION * (otsu_threshold(means) - low)
    return means > threshold


def _channels_last_output(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
    # one-channel inputs leave the first conv's output channels-first; every later layer follows
    return output.contiguous(memory_format=torch.channels_last_3d)


_PREPARED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_PREPARE_LOCK = threading.Lock()


def _fingerprint(model: nn.Module, options: InferenceOptions) -> tuple[object, ...]:
    """What the prepared copy depends on: the options, and every tensor's identity and version
    (in-place updates such as optimiser steps or ``load_state_dict`` bump the version)."""
    state = tuple((id(t), t._version) for t in model.state_dict(keep_vars=True).values())
    switches = (options.fold_batchnorm, options.channels_last, options.compile)
    return (options.device, options.half, *switches, state)


def prepare_network(model: nn.Module, options: InferenceOptions) -> nn.Module:
    """The inference copy that runs: folded, on the device, in the run dtype and layout.

    Preparing (a copy, the folding) takes about a second for the full RRDG, so the copy is kept
    for the next volume while the model's tensors are unchanged. One thread prepares at a time:
    threads that start on one model together share one copy, and a network that is not one of
    mrisr's generators is traced by torch.fx, which is process-global (:mod:`mrisr_cli.fusion`).
    """
    options, _ = resolve_options(options, model)  # callers may pass options as given
    with _PREPARE_LOCK:
        key = _fingerprint(model, options)
        cached = _PREPARED.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        net = _prepare(model, options)
        _PREPARED[model] = (key, net)
        return net


def _prepare(model: nn.Module, options: InferenceOptions) -> nn.Module:
    net = fold_batchnorm(model) if options.fold_batchnorm else copy.deepcopy(model).eval()
    dtype = half_dtype(options.device) if options.half else torch.float32
    net = net.to(device=options.device, dtype=dtype)
    channels_last = True if options.channels_last is None else options.channels_last
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-arg]
        for module in net.modules():
            if isinstance(module, nn.Conv3d):
                module.register_forward_hook(_channels_last_output)
    if options.compile:
        net = _Compiled(net)
    return net


class _Compiled(nn.Module):
    """``torch.compile`` of ``net``, whose compile failures become one line for the user.

    Compiling needs a C++ compiler (and, for CUDA, Python's headers for Triton), which slim
    images such as mrisr's own container do not have; torch reports that as a long traceback.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = torch.compile(net, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._dynamo.exc import BackendCompilerFailed

        try:
            return self.net(x)
        except BackendCompilerFailed as exc:
            reason = next((line for line in str(exc).splitlines() if line.strip()), "")
            raise DeviceError(
                f"--compile failed ({reason.strip()}); run without --compile: compiling needs "
                "a C++ compiler, and Python headers for CUDA"
            ) from None


class _CudaSettings:
    """cuDNN's flags are process-wide: the first run to start sets them, the last to end puts
    back what they were, so runs in several threads neither undo each other's settings nor
    leave them changed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.saved: tuple[bool, bool] = (False, False)

    @contextlib.contextmanager
    def __call__(self, options: InferenceOptions) -> Iterator[None]:
        """cuDNN autotuning on and TF32 off (fp32 stays fp32) for the run; restored afterwards."""
        if not options.device.startswith("cuda"):
            yield
            return
        backends = torch.backends.cudnn
        with self.lock:
            if self.active == 0:
                self.saved = (backends.benchmark, backends.allow_tf32)
            self.active += 1
            backends.benchmark, backends.allow_tf32 = True, False
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1
                if self.active == 0:
                    backends.benchmark, backends.allow_tf32 = self.saved


_cuda_settings = _CudaSettings()


def _batches(items: list[Start], size: int) -> Iterator[list[Start]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _run_batches(
    net: nn.Module,
    padded: np.ndarray,
    grid: TileGrid,
    starts: list[Start],
    options: InferenceOptions,
) -> Iterator[tuple[list[Start], np.ndarray]]:
    """(starts, cropped float32 outputs) batch by batch, in order.

    On CUDA each batch is gathered into one of two pinned buffers, copied asynchronously and run,
    and its result copied back asynchronously; the previous batch's result is handed out while
    the GPU works. The last batch is padded to the full size so that shapes never change.
    """
    size = max(1, options.batch_size)
    device = options.device
    cuda = device.startswith("cuda")
    dtype = half_dtype(device) if options.half else torch.float32
    m = grid.margin
    if not cuda:
        for batch in _batches(starts, size):
            rows = len(batch) if not options.compile else size
            host = np.empty((rows, *grid.patch), np.float32)
            for i, start in enumerate(batch):
                host[i] = padded[grid.patch_slices(start)]
            host[len(batch) :] = host[0]
            out = net(torch.from_numpy(host)[:, None].to(dtype))
            yield batch, crop_core(out[: len(batch), 0].float().numpy(), m)
        return
    inputs = [torch.empty((size, *grid.patch), pin_memory=True) for _ in range(2)]
    outputs = [torch.empty((size, *grid.core), pin_memory=True) for _ in range(2)]
    pending: tuple[torch.cuda.Event, torch.Tensor, list[Start]] | None = None
    # the stream the copies and kernels of ``device`` run on: for cuda:N, not the current device's
    stream = torch.cuda.current_stream(torch.device(device))
    for k, batch in enumerate(_batches(starts, size)):
        host_in, host_out = inputs[k % 2], outputs[k % 2]
        view = host_in.numpy()
        for i, start in enumerate(batch):
            view[i] = padded[grid.patch_slices(start)]
        view[len(batch) :] = view[0]
        x = host_in.to(device, non_blocking=True)[:, None].to(dtype)
        out = net(x)[:, 0, m : m + grid.core[0], m : m + grid.core[1], m : m + grid.core[2]]
        host_out.copy_(out.float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        if pending is not None:
            pending[0].synchronize()
            yield pending[2], pending[1][: len(pending[2])].numpy()
        pending = (event, host_out, batch)
    if pending is not None:
        pending[0].synchronize()
        yield pending[2], pending[1][: len(pending[2])].numpy()


@dataclass
class TilePlan:
    """Which tiles run, which reuse the constant patch's output, which pass the input through."""

    grid: TileGrid
    run: list[Start]
    constant: list[Start]
    background: list[Start]

    @property
    def voxels_run(self) -> int:
        """Voxels the network processes (patches run, with their margins)."""
        patch = int(np.prod(self.grid.patch))
        return (len(self.run) + (1 if self.constant else 0)) * patch


def plan_tiles(padded: np.ndarray, grid: TileGrid, options: InferenceOptions) -> TilePlan:
    """Sort the tiles of ``grid`` by the rules of this module's docstring."""
    starts = list(grid.starts())
    if options.skip_background:
        volume = padded[tuple(slice(grid.margin, grid.margin + n) for n in grid.shape)]
        has_content = tiles_with_content(grid, content_blocks(volume), CONTENT_BLOCK)
    else:
        has_content = [True] * len(starts)
    plan = TilePlan(grid, [], [], [])
    constant_value: float | None = None
    for start, content in zip(starts, has_content, strict=True):
        patch = padded[grid.patch_slices(start)]
        first = float(patch.flat[0])
        if bool((patch == first).all()):
            if options.skip_constant and constant_value in (None, first):
                constant_value = first
                plan.constant.append(start)
            else:  # a constant patch is never passed through: its output is the network's
                plan.run.append(start)
        elif not content:
            plan.background.append(start)
        else:
            plan.run.append(start)
    return plan


def super_resolve(
    volume: np.ndarray,
    model: nn.Module,
    options: InferenceOptions | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Tile, run, crop and stitch: the network's output for the whole volume (same shape).

    ``half`` runs only where it is fast (:func:`resolve_options`): on a CPU without native bf16
    it runs fp32, which is ~90x faster than emulated bf16 (docs/speed.md). ``volume`` is what the
    network reads as it is (normalised, on the model's grid: see
    :func:`~mrisr_cli.pipeline.upsample_array`); non-finite, constant or non-3D arrays are an
    InputError, and the device is checked (:func:`resolve_device`).
    """
    volume = checked_array(volume, "super_resolve")
    options, _ = resolve_options(options or InferenceOptions(), model)
    grid = TileGrid(tuple(volume.shape), options.patch, options.margin, options.overlap)  # type: ignore[arg-type]
    padded = pad_for_grid(volume.astype(np.float32, copy=False), grid)
    plan = plan_tiles(padded, grid, options)
    canvas = empty_canvas(grid)
    window = blend_window(grid) if grid.overlap else None
    weights = np.zeros_like(canvas) if window is not None else None

    def place(start: Start, core: np.ndarray) -> None:
        where = grid.core_slices(start)
        if weights is None:
            canvas[where] = core
        else:
            canvas[where] += core * window
            weights[where] += window

    total, done = len(grid), 0
    for start in plan.background:
        place(start, crop_core(padded[grid.patch_slices(start)], grid.margin))
    done += len(plan.background)
    to_run = plan.constant[:1] + plan.run
    if to_run:
        net = prepare_network(model, options)
        try:
            with _cuda_settings(options), torch.inference_mode():
                for batch, outputs in _run_batches(net, padded, grid, to_run, options):
                    for start, out in zip(batch, outputs, strict=True):
                        probe = bool(plan.constant) and start == plan.constant[0]
                        targets = plan.constant if probe else [start]
                        for target in targets:
                            place(target, out)
                        done += len(targets)
                    if progress:
                        progress(done, total)
        except torch.OutOfMemoryError as exc:
            raise DeviceError(
                f"out of GPU memory with --batch-size {options.batch_size}; try a smaller one"
            ) from exc
    if progress and not to_run:
        progress(total, total)
    if weights is not None:
        canvas /= weights
    return finish_canvas(canvas, grid)
