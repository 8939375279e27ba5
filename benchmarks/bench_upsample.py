"""Seconds per 1 mm brain for `mrisr upsample`, where they go, and how close to the hardware.

    python benchmarks/bench_upsample.py                   # every device and precision here
    python benchmarks/bench_upsample.py --full            # every tile for real (default on CUDA)
    python benchmarks/bench_upsample.py --parts n4        # N4 settings: speed and error
    python benchmarks/bench_upsample.py --parts tiles     # tile size / overlap: seams and speed
    python benchmarks/bench_upsample.py --network 8,1,4 --shape 96,112,96 --parts table,n4  # smoke

The volume is a real whole-head 1 mm T1 ($MRISR_DATA or ../shared/data:
t1/S06_brainchop_t1_crop, 256^3), or without the data a synthetic head of the same size, on the
axes `mrisr upsample` tiles (canonical: S06 is stored LIA, and its stored axes give 91 tiles run
where `upsample` runs 97). The network is the paper's full-size RRDG (48 features, 4 RRDBs,
growth 12) with random weights: speed does not depend on the values. N4 is off in the pipeline
runs and timed on its own.

For each device and precision the table gives:

- ``ref``: the in-process reference, the prepared network on one batch of real patches
  (voxels/s, TFLOP/s from the exact convolution count, fraction of the device's peak);
- ``s/vol``: `upsample` of the file (read, mask, normalise, tile, run, stitch, write; no N4);
- the split: I/O (read + write), tiling (everything in the inference step but the network), network;
- ``overhead``: s/vol / (voxels the network processed / reference throughput), goal < 1.3;
- ``in-run``: inside one timed ``super_resolve`` of the sample, its seconds / seconds inside
  the network's forward (CPU rows), and ``overhd*`` = in-run + (I/O + tiling) / (voxels run /
  reference throughput): the overhead ratio free of the load drifting between the reference
  and the sample runs on a shared machine;
- ``vs bare``: s/vol / (every patch of the grid, no skipping, at reference throughput), goal <= 0.6;
- peak host memory (RSS sampled every 20 ms) and peak GPU memory.

"before" is the straightforward path (no background skipping, no BatchNorm folding,
channels-first); "after" is the default. On a CPU without ``--full``, the network time is
EXTRAPOLATED: the pipeline is run on the whole volume with a 1x1x1 stand-in network (all
non-network costs, measured), plus the number of tiles that run times the seconds per tile of
the real network measured inside ``super_resolve`` on a crop of ``--sample`` head tiles (one
batch); reference and sample alternate ``--rounds`` times and the best of each is kept, as the
load of a shared machine varies. Rows say ``extrapolated`` when that is so.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.grid import plan_grid
from mrisr_cli.inference import (
    InferenceOptions,
    fast_half_available,
    half_dtype,
    plan_tiles,
    prepare_network,
    resolve_options,
    super_resolve,
)
from mrisr_cli.intensity import foreground_mask, foreground_stats
from mrisr_cli.networks import NetworkConfig, build_network
from mrisr_cli.pipeline import UpsampleOptions, load_generator_files, upsample_file
from mrisr_cli.tiling import TileGrid, pad_for_grid
from mrisr_cli.volumes import load_volume
from mrisr_cli.weights import save_weights

REPO = Path(__file__).resolve().parents[1]
VOLUME = "t1/S06_brainchop_t1_crop.nii.gz"
SHAPE = (256, 256, 256)

#: Dense peak TFLOP/s (no sparsity) by device name and precision; fp32 is without TF32.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"fp16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"fp16": 756.0, "fp32": 51.2},
    "H100": {"fp16": 989.4, "fp32": 66.9},
    "A100": {"fp16": 312.0, "fp32": 19.5},
    "L40S": {"fp16": 362.1, "fp32": 91.6},
    "RTX 4090": {"fp16": 165.2, "fp32": 82.6},
    "1080 Ti": {"fp16": 0.17, "fp32": 11.3},
}


def data_dir() -> Path | None:
    folder = Path(os.environ.get("MRISR_DATA", REPO.parent / "shared" / "data"))
    return folder if folder.is_dir() else None


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def synthetic_head(shape: tuple[int, int, int]) -> np.ndarray:
    """An ellipsoid 'head' (scalp, skull, CSF/GM/WM-like shells, texture) in noisy air."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    radii = np.array(shape, dtype=np.float32)[:, None, None, None] * 0.4
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(axis=0))
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 2) * 20
    head = np.select([r < 0.6, r < 0.8, r < 0.88, r < 0.93, r < 1.0], [110, 80, 30, 10, 70], 0.0)
    air = np.abs(rng.normal(0, 3, shape)).astype(np.float32)
    return np.where(r < 1.0, np.clip(head + texture, 1, None), air).astype(np.float32)


def cpu_peak_gflops(threads: int) -> float:
    """Theoretical fp32 peak: cores x clock x FLOP/cycle (2 FMA units x 8 or 16 lanes x 2)."""
    mhz = 0.0
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":")[1])
            if line.startswith("flags") and not flags:
                flags = line
    lanes = 16 if " avx512f" in flags else 8
    return threads * mhz / 1e3 * 2 * lanes * 2


def gpu_peak_tflops(name: str, precision: str) -> float | None:
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks.get(precision)
    return None


def conv_flops_per_voxel(model: nn.Module) -> float:
    """2 x multiply-adds of every convolution per output voxel (exact for same-size convs)."""
    total = 0

    def count(module: nn.Module, _args: object, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv3d)
        total += (
            2 * out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        )

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv3d)]
    with torch.inference_mode():
        model.to("cpu").eval()(torch.zeros(1, 1, 8, 8, 8))
    for hook in hooks:
        hook.remove()
    return total / 8**3


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    @contextlib.contextmanager
    def watch(self) -> Iterator[PeakRss]:
        thread = threading.Thread(target=self._watch, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Case:
    """The benchmark volume: its file, its normalised model-grid array and the network files."""

    path: Path
    source: str
    normalised: np.ndarray
    head: np.ndarray
    weights: Path
    network: NetworkConfig


def make_case(args: argparse.Namespace, root: Path) -> Case:
    folder = data_dir()
    if args.shape is None and folder is not None and (folder / args.volume).exists():
        path, source = folder / args.volume, args.volume
    else:
        shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else SHAPE
        path, source = root / "synthetic.nii.gz", f"synthetic head {shape}"
        nib.save(nib.Nifti1Image(synthetic_head(shape), np.eye(4)), str(path))  # type: ignore[arg-type]
    features, blocks, growth = (int(v) for v in args.network.split(","))
    network = NetworkConfig("rrdg", {"features": features, "blocks": blocks, "growth": growth})
    torch.manual_seed(0)
    model = build_network(network)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    weights = root / "rrdg.safetensors"
    save_weights(weights, model.state_dict(), network, NO_N4)
    # on the axes `upsample_file` tiles (canonical, model grid): the stored axes of a non-RAS file
    # (S06 is LIA) give another tile count (91 instead of 97 on S06), which the CPU rows multiply
    volume = load_volume(path)
    plan = plan_grid(volume.affine, volume.data.shape, NO_N4)  # type: ignore[arg-type]
    data = plan.permute(plan.to_model(volume.data))
    head = foreground_mask(data)
    normalised = foreground_stats(data, head).normalise(data)
    return Case(Path(path), source, normalised, head, weights, network)


NO_N4 = DegradationConfig(n4=False)
SEAM_BORDER = 16
BEFORE = {"skip_background": False, "fold_batchnorm": False, "channels_last": False}


class StandIn(nn.Module):
    """A 1x1x1 identity convolution: the pipeline's every cost but the network's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)
        nn.init.ones_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def head_patches(case: Case, grid: TileGrid, count: int) -> np.ndarray:
    """``count`` real patches from the head (the tiles nearest its centre)."""
    padded = pad_for_grid(case.normalised, grid)
    centre = np.argwhere(case.head).mean(axis=0)
    starts = sorted(
        grid.starts(),
        key=lambda s: float(np.sum((np.array(s) + np.array(grid.core) / 2 - centre) ** 2)),
    )
    return np.stack([padded[grid.patch_slices(s)] for s in starts[:count]])


def reference_throughput(
    model: nn.Module,
    patches: np.ndarray,
    options: InferenceOptions,
    repeats: int,
    warm_up: bool = True,
) -> float:
    """Voxels per second of the prepared network on one batch (after one warm-up call)."""
    options, _ = resolve_options(options, model)  # no device given: the model's
    net = prepare_network(model, options)
    dtype = half_dtype(options.device) if options.half else torch.float32
    x = torch.from_numpy(patches)[:, None].to(options.device, dtype)
    best = math.inf
    with torch.inference_mode():
        if warm_up:
            net(x[:1])
            synchronize(options.device)
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            synchronize(options.device)
            best = min(best, time.perf_counter() - start)
    return patches.size / best


def sample_crop(case: Case, grid: TileGrid, tiles: int) -> np.ndarray:
    """A crop of the head holding exactly ``tiles`` cores of the default grid along axis 1."""
    core = grid.core
    wanted = (core[0], core[1] * tiles, core[2])
    shape = tuple(min(w, n) for w, n in zip(wanted, case.normalised.shape, strict=True))
    centre = np.argwhere(case.head).mean(axis=0).astype(int)
    lo = [
        int(np.clip(c - n // 2, 0, s - n))
        for c, n, s in zip(centre, shape, case.normalised.shape, strict=True)
    ]
    return case.normalised[tuple(slice(a, a + n) for a, n in zip(lo, shape, strict=True))].copy()


class ForwardTimer:
    """Seconds spent inside the prepared network's forward calls while the block runs."""

    def __init__(self, model: nn.Module, options: InferenceOptions) -> None:
        options, _ = resolve_options(options, model)  # as super_resolve resolves them
        self.net = prepare_network(model, options)  # the cached copy super_resolve will use
        self.device = options.device
        self.seconds = 0.0
        self._start = 0.0

    def _pre(self, *_: object) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _post(self, *_: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> ForwardTimer:
        self._hooks = [
            self.net.register_forward_pre_hook(self._pre),
            self.net.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *_: object) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclass
class Row:
    device: str
    precision: str
    variant: str
    ref_vps: float
    seconds: float
    io: float
    tiling: float
    network: float
    voxels_run: int
    voxels_all: int
    rss: int
    gpu_mem: int
    extrapolated: bool
    in_run: float = math.nan


def run_file(
    case: Case, generator_model: nn.Module | None, options: InferenceOptions, device: str, out: Path
) -> tuple[dict[str, float], int, int]:
    """`upsample_file` on the case; seconds, peak RSS and peak GPU memory."""
    generator = load_generator_files(case.weights, None).generator(1.0, device)
    if generator_model is not None:
        generator.model = generator_model.to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakRss().watch() as rss:
        result = upsample_file(
            case.path, out, generator, UpsampleOptions(inference=options, n4=False, overwrite=True)
        )
        synchronize(device)
    gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return result.seconds, rss.peak, gpu


def measure(
    case: Case, device: str, half: bool, variant: str, args: argparse.Namespace, root: Path
) -> Row:
    options = InferenceOptions(device=device, half=half, batch_size=args.batch_size)
    if variant == "before":
        options = replace(options, **BEFORE)
    if args.compile and variant == "after":
        options = replace(options, compile=True)
    model = load_generator_files(case.weights, None).generator(1.0, "cpu").model
    grid = TileGrid(case.normalised.shape, options.patch, options.margin, options.overlap)  # type: ignore[arg-type]
    plan = plan_tiles(pad_for_grid(case.normalised, grid), grid, options)
    voxels_all = len(grid) * math.prod(grid.patch)
    ref_batch = args.ref_batch or (options.batch_size if device == "cpu" else 32)
    patches = head_patches(case, grid, ref_batch)
    out = root / f"out_{device.replace(':', '')}_{half}_{variant}.nii.gz"
    full = args.full or device.startswith("cuda")
    stand_seconds, rss_stand, _ = run_file(case, StandIn(), options, device, out)
    tiling = stand_seconds["network"]
    repeats = 1 if device == "cpu" else 5
    if full:
        ref_vps = reference_throughput(model, patches, options, repeats)
        seconds, rss, gpu = run_file(case, None, options, device, out)
        network = seconds["network"] - tiling
    else:  # reference and sample alternate, best of each: the load of a shared machine varies
        crop = sample_crop(case, grid, args.sample or options.batch_size)
        crop_grid = TileGrid(crop.shape, options.patch, options.margin, options.overlap)  # type: ignore[arg-type]
        crop_tiles = len(plan_tiles(pad_for_grid(crop, crop_grid), crop_grid, options).run)
        ref_vps, per_tile, peak, in_run = 0.0, math.inf, 0, math.inf
        for round_ in range(args.rounds):
            vps = reference_throughput(model, patches, options, repeats, warm_up=round_ == 0)
            ref_vps = max(ref_vps, vps)
            with PeakRss().watch() as rss_sample, ForwardTimer(model, options) as timer:
                start = time.perf_counter()
                super_resolve(crop, model, options)
                elapsed = time.perf_counter() - start
            per_tile = min(per_tile, elapsed / max(1, crop_tiles))
            in_run = min(in_run, elapsed / timer.seconds)
            peak = max(peak, rss_sample.peak)
        network = (len(plan.run) + (1 if plan.constant else 0)) * per_tile
        seconds = dict(stand_seconds)
        seconds["total"] = stand_seconds["total"] + network
        rss, gpu = max(rss_stand, peak), 0
    return Row(
        device=device,
        precision=("fp16" if device.startswith("cuda") else "bf16") if half else "fp32",
        variant=variant + (" +compile" if options.compile else ""),
        ref_vps=ref_vps,
        seconds=seconds["total"] - seconds["n4"],
        io=seconds["read"] + seconds["write"],
        tiling=tiling,
        network=network,
        voxels_run=plan.voxels_run,
        voxels_all=voxels_all,
        rss=rss,
        gpu_mem=gpu,
        extrapolated=not full,
        in_run=math.nan if full else in_run,
    )


def print_rows(rows: list[Row], flops_per_voxel: float, threads: int) -> None:
    header = (
        f"{'device':<8}{'prec':<6}{'variant':<17}{'ref Mvox/s':>11}{'TFLOP/s':>9}{'%peak':>7}"
        f"{'s/vol':>9}{'I/O':>7}{'tiling':>8}{'network':>9}{'overhead':>9}{'vs bare':>8}"
        f"{'RSS GB':>8}{'GPU GB':>8}{'in-run':>7}{'overhd*':>8}  note"
    )
    print(header)
    for r in rows:
        tflops = r.ref_vps * flops_per_voxel / 1e12
        if r.device.startswith("cuda"):
            peak = gpu_peak_tflops(torch.cuda.get_device_name(r.device), r.precision)
        else:
            peak = cpu_peak_gflops(threads) / 1e3
        share = f"{100 * tflops / peak:.1f}" if peak else "-"
        ideal = r.voxels_run / r.ref_vps
        bare = r.voxels_all / r.ref_vps
        print(
            f"{r.device:<8}{r.precision:<6}{r.variant:<17}{r.ref_vps / 1e6:>11.3f}{tflops:>9.3f}"
            f"{share:>7}{r.seconds:>9.1f}{r.io:>7.1f}{r.tiling:>8.1f}{r.network:>9.1f}"
            f"{r.seconds / ideal:>9.2f}{r.seconds / bare:>8.2f}{r.rss / 2**30:>8.2f}"
            f"{r.gpu_mem / 2**30:>8.2f}{r.in_run:>7.3f}"
            f"{r.in_run + (r.io + r.tiling) / ideal:>8.3f}"
            f"  {'extrapolated' if r.extrapolated else 'measured'}"
        )


def n4_study(case: Case, volume: str | None) -> None:
    """N4 settings against ANTsPy's defaults: seconds, and the corrected image's deviation.

    Deviation: |corrected - default corrected| / default corrected inside the head, in %. The
    "100 iterations" row is the default's own distance from convergence. "head mask" fits the
    field inside ``foreground_mask`` only; its deviation is also given after scaling its output
    to the default's mean inside the head ("scale matched").
    """
    import ants

    folder = data_dir()
    path = folder / volume if volume and folder is not None else case.path
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    mask = foreground_mask(data)
    image = ants.from_numpy(np.ascontiguousarray(data - data.min() + 1.0), spacing=(1.0,) * 3)
    settings = [
        ("ANTsPy = mrisr", 4, [50, 50, 50, 50], 1e-7),
        ("tol 1e-5", 4, [50, 50, 50, 50], 1e-5),
        ("shrink 5", 5, [50, 50, 50, 50], 1e-7),
        ("shrink 6", 6, [50, 50, 50, 50], 1e-7),
        ("shrink 8", 8, [50, 50, 50, 50], 1e-7),
        ("20 iterations", 4, [20, 20, 20, 20], 1e-7),
        ("100 iterations", 4, [100, 100, 100, 100], 1e-7),
        ("head mask", 4, [50, 50, 50, 50], 1e-7),
    ]
    head = ants.from_numpy(mask.astype(np.float32), spacing=(1.0,) * 3)
    reference = None
    print(f"\nN4 on {volume or case.source} {data.shape} ({load_average()})")
    print(
        f"{'setting':<16}{'shrink':>7}{'iterations':>17}{'tol':>8}{'s':>7}{'speed-up':>9}"
        f"{'median %':>10}{'p99 %':>8}{'max %':>8}"
    )
    base = 0.0
    for label, shrink, iters, tol in settings:
        start = time.perf_counter()
        out = ants.n4_bias_field_correction(
            image,
            mask=head if label == "head mask" else None,
            shrink_factor=shrink,
            convergence={"iters": iters, "tol": tol},
        ).numpy()
        seconds = time.perf_counter() - start
        if reference is None:
            reference, base = out, seconds
        rel = np.abs(out[mask] - reference[mask]) / reference[mask] * 100
        print(
            f"{label:<16}{shrink:>7}{'x'.join(map(str, iters)):>17}{tol:>8.0e}{seconds:>7.1f}"
            f"{base / seconds:>9.1f}{np.median(rel):>10.3f}{np.percentile(rel, 99):>8.3f}"
            f"{rel.max():>8.2f}"
        )
        if label == "head mask":
            matched = out * (reference[mask].mean() / out[mask].mean())
            rel = np.abs(matched[mask] - reference[mask]) / reference[mask] * 100
            print(
                f"{'  scale matched':<64}{np.median(rel):>10.3f}{np.percentile(rel, 99):>8.3f}"
                f"{rel.max():>8.2f}"
            )


#: The tilings of docs/speed.md's tile table (label, patch, margin, overlap), in its row order.
TILINGS: list[tuple[str, tuple[int, int, int], int, int]] = [
    ("paper 64x40x64 m3", (64, 40, 64), 3, 0),
    ("64x40x64 m3 overlap 8", (64, 40, 64), 3, 8),
    ("64x40x64 m6", (64, 40, 64), 6, 0),
    ("96x96x96 m3", (96, 96, 96), 3, 0),
    ("96x96x96 m3 overlap 8", (96, 96, 96), 3, 8),
    ("96x96x96 m6", (96, 96, 96), 6, 0),
    ("128x128x128 m3", (128, 128, 128), 3, 0),
    ("128x128x128 m6", (128, 128, 128), 6, 0),
]


def tiles_study(case: Case, args: argparse.Namespace) -> None:
    """Seams (difference from whole-volume inference) and the cost of each tiling."""
    configs = TILINGS
    if args.tilings:
        wanted = [w.strip() for w in args.tilings.split(";")]
        configs = [c for c in configs if any(w in c[0] for w in wanted)]
    # Seams: a full-depth (same receptive field) but narrow RRDG, so whole-crop inference fits.
    torch.manual_seed(1)
    narrow = build_network(NetworkConfig("rrdg", {"features": 16, "blocks": 4, "growth": 4}))
    for module in narrow.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    narrow.eval()
    shape = tuple(int(s) for s in args.seam_crop.split(","))
    centre = np.argwhere(case.head).mean(axis=0).astype(int)
    lo = [
        int(np.clip(c - n // 2, 0, s - n))
        for c, n, s in zip(centre, shape, case.normalised.shape, strict=True)
    ]
    box = tuple(slice(a, a + n) for a, n in zip(lo, shape, strict=True))
    crop = case.normalised[box].copy()
    inner = (slice(SEAM_BORDER, -SEAM_BORDER),) * 3
    with torch.inference_mode():
        whole_net = prepare_network(narrow, InferenceOptions())
        whole = whole_net(torch.from_numpy(crop)[None, None])[0, 0].numpy()
    scale = float(whole[inner].std())
    # Speed: per-voxel throughput at each patch size of a one-RRDB full-width proxy (the same
    # layer shapes as the full network, a quarter of the depth), scaled by the FLOP ratio.
    features, _, growth = (int(v) for v in args.network.split(","))
    proxy_config = NetworkConfig("rrdg", {"features": features, "blocks": 1, "growth": growth})
    proxy = build_network(proxy_config).eval()
    ratio = conv_flops_per_voxel(build_network(case.network)) / conv_flops_per_voxel(proxy)
    throughput: dict[tuple[int, int, int], float] = {}
    print(
        f"\nTiling study ({load_average()}). Seams: a {shape} head crop, narrow full-depth RRDG "
        f"(16 features, 4 RRDBs: the same receptive field), compared {SEAM_BORDER} voxels or more "
        f"from the crop's faces. Cost: tiles and voxels on the whole {case.normalised.shape} "
        f"volume; seconds per patch of the full RRDG EXTRAPOLATED from a one-RRDB proxy "
        f"(x{ratio:.2f} FLOPs), one patch per size."
    )
    print(
        f"{'tiling':<24}{'tiles':>6}{'Mvox run':>10}{'s/patch':>9}{'s/vol':>8}"
        f"{'seam RMS':>10}{'seam max':>10}{'PSNR dB':>9}"
    )
    for label, patch, margin, overlap in configs:
        options = InferenceOptions(patch=patch, margin=margin, overlap=overlap)
        tiled = super_resolve(crop, narrow, options)
        diff = (tiled - whole)[inner]
        rms = float(np.sqrt(np.mean(diff**2)))
        peak = float(whole[inner].max() - whole[inner].min())
        psnr = 20 * math.log10(peak / max(rms, 1e-12))
        grid = TileGrid(case.normalised.shape, patch, margin, overlap)  # type: ignore[arg-type]
        plan = plan_tiles(pad_for_grid(case.normalised, grid), grid, options)
        if patch not in throughput:
            probe = head_patches(case, grid, 1)
            vps = reference_throughput(proxy, probe, InferenceOptions(), 1, warm_up=False)
            throughput[patch] = vps / ratio
        tiles = len(plan.run) + bool(plan.constant)
        crop_grid = TileGrid(crop.shape, patch, margin, overlap)  # type: ignore[arg-type]
        seams = any(
            SEAM_BORDER <= k * stride < n - SEAM_BORDER
            for count, stride, n in zip(crop_grid.counts, crop_grid.stride, shape, strict=True)
            for k in range(1, count)
        )
        per_patch, per_volume = (
            math.prod(patch) / throughput[patch],
            plan.voxels_run / throughput[patch],
        )
        print(
            f"{label:<24}{tiles:>6}{plan.voxels_run / 1e6:>10.1f}"
            f"{per_patch:>9.1f}{per_volume:>8.0f}"
            + (
                f"{rms / scale:>10.4f}{float(np.abs(diff).max()) / scale:>10.3f}{psnr:>9.1f}"
                if seams
                else f"{'no seam in the crop':>29}"
            ),
            flush=True,
        )
    print(
        "seam RMS / max: |tiled - whole-volume inference|, in units of the whole-volume output's "
        "std; PSNR of the tiled output against it"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads [all available]")
    parser.add_argument("--volume", default=VOLUME, help="path under the data folder")
    parser.add_argument("--shape", default=None, help="synthetic volume shape, e.g. 96,112,96")
    parser.add_argument("--network", default="48,4,12", help="RRDG features,blocks,growth")
    parser.add_argument("--batch-size", type=int, default=4, help="patches per network call")
    parser.add_argument(
        "--ref-batch", type=int, default=0, help="reference batch [CPU: batch size, GPU 32]"
    )
    parser.add_argument("--sample", type=int, default=0, help="head tiles timed [batch size]")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds (CPU)")
    parser.add_argument("--full", action="store_true", help="run every tile (default on CUDA)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile 'after'")
    parser.add_argument("--devices", default="auto", help="cpu, cuda or both [auto: all here]")
    parser.add_argument("--variants", default="before,after", help="before and/or after")
    parser.add_argument("--parts", default="table", help="any of table,n4,tiles")
    parser.add_argument("--tilings", default="", help="tiling rows to run, e.g. '128x;m6'")
    parser.add_argument("--n4-volume", default=None, help="N4 study volume [the case's]")
    parser.add_argument("--seam-crop", default="128,112,128", help="crop for the seam study")
    args = parser.parse_args()

    from mrisr_cli.threads import configure_threads

    # --threads, else SLURM_CPUS_PER_TASK / OMP_NUM_THREADS, else the CPUs this process may use
    # (affinity capped by the cgroup's CPU quota: mrisr_cli.threads.available_cpus)
    threads = configure_threads(args.threads or None)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.devices != "auto":
        devices = args.devices.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        case = make_case(args, root)
        flops = conv_flops_per_voxel(build_network(case.network))
        print(
            f"volume: {case.source} {case.normalised.shape}; network: {case.network.params}, "
            f"{flops / 1e6:.2f} MFLOP/voxel; CPU threads: {threads}; torch {torch.__version__}"
        )
        if torch.cuda.is_available():
            print(f"GPU: {torch.cuda.get_device_name()}")
        print(
            f"CPU fp32 peak (theoretical): {cpu_peak_gflops(threads):.0f} GFLOP/s; native bf16: "
            f"{fast_half_available('cpu')}"
        )
        rows: list[Row] = []
        parts = set(args.parts.split(","))
        for device in devices if "table" in parts else []:
            for half in (False, True):
                if half and not fast_half_available(device):
                    print(f"{device} half: no native bf16 here, `--half` runs fp32 (see docs)")
                    continue
                for variant in args.variants.split(","):
                    print(
                        f"  measuring {device} {'half' if half else 'fp32'} {variant} "
                        f"({load_average()})",
                        flush=True,
                    )
                    rows.append(measure(case, device, half, variant, args, root))
        if rows:
            print(f"\n({load_average()})")
            print_rows(rows, flops, threads)
        if "n4" in parts:
            n4_study(case, args.n4_volume)
        if "tiles" in parts:
            tiles_study(case, args)
        print(f"({load_average()})")


if __name__ == "__main__":
    main()
