"""Seconds per volume of each network of the comparison table, through `mrisr upsample`'s code.

    python benchmarks/bench_networks.py --threads 2                      # the README's CPU column
    python benchmarks/bench_networks.py --weights-dir carry/trained      # the trained files
    python benchmarks/bench_networks.py --shape 48,56,48 --networks fsrcnn,rrdg   # a smoke run

The volume is a real 1 mm T1 of the test split ($MRISR_DATA or ../shared/data, default
t1/S18_voxelmorph_test_vol, 160 x 192 x 224), degraded by the SPEC degradation, so that the
network gets what `upsample` gets on the test split; without the data, a synthetic head.
Each network runs the whole path of `upsample_file`: read, mask, normalise, tile, the network on
every tile that holds head (the same tiles for every network: the decision depends on the input
only), stitch, write; no N4 (the test volumes were corrected when prepared). Nothing is
extrapolated: every tile runs.

Weights: ``<network>.safetensors`` from ``--weights-dir`` when there (RRDG: also
``rrdg_psnr.safetensors``), else random weights of the paper's configuration; the speed does not
depend on the values. Ratios are to RRDG's run in the same process. Results: a rich table, and
``--json`` / ``--csv`` files.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from bench_upsample import PeakRss, conv_flops_per_voxel, data_dir, load_average, synthetic_head
from rich.console import Console
from rich.table import Table

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.degrade_file import degrade_file
from mrisr_cli.inference import InferenceOptions, resolve_device
from mrisr_cli.networks import GENERATORS, NetworkConfig, build_network, count_parameters
from mrisr_cli.pipeline import UpsampleOptions, load_generator_files, upsample_file
from mrisr_cli.threads import configure_threads
from mrisr_cli.weights import save_weights

VOLUME = "t1/S18_voxelmorph_test_vol.nii.gz"
NO_N4 = DegradationConfig(n4=False)


def weights_for(name: str, folder: Path | None, root: Path) -> tuple[Path, str]:
    """The trained file for ``name`` when ``folder`` has one, else random paper-size weights."""
    if folder is not None:
        for candidate in (f"{name}.safetensors", f"{name}_psnr.safetensors"):
            if (folder / candidate).is_file():
                return folder / candidate, "trained"
    torch.manual_seed(0)
    path = root / f"{name}.safetensors"
    network = NetworkConfig(name)
    save_weights(path, build_network(network).state_dict(), network, NO_N4)
    return path, "random"


def make_input(volume: str, shape: str | None, root: Path) -> tuple[Path, str]:
    """The network input: the real test scan (or a synthetic head) after the SPEC degradation."""
    folder = data_dir()
    if shape is None and folder is not None and (folder / volume).exists():
        source, label = folder / volume, volume
    else:
        size = tuple(int(s) for s in shape.split(",")) if shape else (160, 192, 224)
        source, label = root / "synthetic.nii.gz", "synthetic head"
        nib.save(nib.Nifti1Image(synthetic_head(size), np.eye(4)), str(source))  # type: ignore[arg-type]
    lr = root / "lr.nii.gz"
    degrade_file(source, lr, DegradationConfig())
    return lr, label


def run(
    name: str, weights: Path, lr: Path, options: InferenceOptions, device: str, root: Path
) -> dict[str, float | int | str | None]:
    generator = load_generator_files(weights, None).generator(1.0, device)
    model = generator.model
    flops = conv_flops_per_voxel(build_network(generator.weights.network))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakRss().watch() as rss:
        result = upsample_file(
            lr,
            root / f"{name}.nii.gz",
            generator,
            UpsampleOptions(inference=options, n4=False, overwrite=True, sidecar=False),
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    seconds = result.seconds
    voxels = int(np.prod(result.output_shape))
    return {
        "network": name,
        "parameters": count_parameters(model),
        "gflop_per_kvoxel": flops / 1e6,
        "seconds": seconds["total"],
        "network_seconds": seconds["network"],
        "io_seconds": seconds["read"] + seconds["write"],
        "voxels_per_second": voxels / seconds["total"],
        "peak_rss_gib": rss.peak / 2**30,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.startswith("cuda")
        else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(GENERATORS), help="comma-separated")
    parser.add_argument("--weights-dir", type=Path, default=None, help="trained <net>.safetensors")
    parser.add_argument("--volume", default=VOLUME, help="path under the data folder")
    parser.add_argument("--shape", default=None, help="synthetic volume shape, e.g. 48,56,48")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--half", action="store_true", help="fp16/bf16 inference")
    parser.add_argument("--batch-size", type=int, default=4, help="patches per network call")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads [all available]")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows as CSV")
    args = parser.parse_args()
    if args.threads:
        configure_threads(args.threads)  # torch, ITK and OpenMP, as `mrisr upsample --threads`
    device = resolve_device(args.device)
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    options = InferenceOptions(device=device, half=args.half, batch_size=args.batch_size)
    console = Console(width=150)
    rows: list[dict[str, float | int | str | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lr, label = make_input(args.volume, args.shape, root)
        shape = nib.load(str(lr)).shape
        where = (
            torch.cuda.get_device_name(0)
            if device.startswith("cuda")
            else f"{torch.get_num_threads()} CPU threads ({os.cpu_count()} cores here)"
        )
        console.print(
            f"{label} {shape}, {where}, {'half' if args.half else 'fp32'}, "
            f"batch {args.batch_size}, torch {torch.__version__}, {load_average()}"
        )
        for name in names:
            weights, kind = weights_for(name, args.weights_dir, root)
            started = time.perf_counter()
            row = run(name, weights, lr, options, device, root)
            row["weights"] = kind
            rows.append(row)
            console.print(
                f"{name}: {row['seconds']:.1f} s ({time.perf_counter() - started:.1f} s with "
                f"loading), {load_average()}"
            )
    reference = next((r for r in rows if r["network"] == "rrdg"), None)
    table = Table(title=f"seconds per volume, {label} {shape}, {where}")
    for column in (
        "network",
        "weights",
        "#params",
        "GFLOP/kvox",
        "s/vol",
        "network s",
        "I/O s",
        "Mvox/s",
        "peak RSS GiB",
        "peak GPU GiB",
        "vs RRDG",
    ):
        table.add_column(column, justify="left" if column in ("network", "weights") else "right")
    for r in rows:
        ratio = f"{float(r['seconds']) / float(reference['seconds']):.3f}" if reference else "-"
        r["ratio_to_rrdg"] = float(ratio) if reference else None
        table.add_row(
            str(r["network"]),
            str(r["weights"]),
            f"{r['parameters']:,}",
            f"{float(r['gflop_per_kvoxel']):.2f}",
            f"{float(r['seconds']):.1f}",
            f"{float(r['network_seconds']):.1f}",
            f"{float(r['io_seconds']):.1f}",
            f"{float(r['voxels_per_second']) / 1e6:.3f}",
            f"{float(r['peak_rss_gib']):.2f}",
            f"{float(r['peak_gpu_gib']):.2f}",
            ratio,
        )
    console.print(table)
    meta = {
        "volume": label,
        "shape": list(shape),
        "device": where,
        "half": args.half,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
    }
    if args.json:
        args.json.write_text(json.dumps({"run": meta, "rows": rows}, indent=1) + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
