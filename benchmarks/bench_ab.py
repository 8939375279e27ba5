"""Seconds of the full RRDG on one 64x40x64 head patch: plain, folded, folded + channels-last.

    python benchmarks/bench_ab.py --threads 2               # 3 interleaved rounds (~2-3 min)
    python benchmarks/bench_ab.py --network 8,1,4 --rounds 1  # a smoke run

The network is built as ``bench_upsample.py`` builds it (random weights, BatchNorm statistics
drawn at random); the patch is the head tile nearest the head's centre of S06 on the axes that
`mrisr upsample` tiles (or of a synthetic head without the data). Each variant is the inference
copy that ``inference.prepare_network`` makes: "plain" (BatchNorm unfolded, channels-first, the
benchmark's "before"), "folded" (BatchNorm folded, channels-first) and "folded + CL" (the default).
Every variant runs once untimed, then the variants alternate ``--rounds`` times (the load of a
shared machine drifts); the median and the best of each are printed with the load average, and
each variant's speed-up over "plain" (plain's median seconds / the variant's median seconds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_upsample import head_patches, load_average, make_case

from mrisr_cli.inference import InferenceOptions, prepare_network
from mrisr_cli.pipeline import load_generator_files
from mrisr_cli.threads import configure_threads
from mrisr_cli.tiling import TileGrid

VARIANTS: dict[str, InferenceOptions] = {
    "plain": InferenceOptions(fold_batchnorm=False, channels_last=False),
    "folded": InferenceOptions(fold_batchnorm=True, channels_last=False),
    "folded + CL": InferenceOptions(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads [all available]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--network", default="48,4,12", help="RRDG features,blocks,growth")
    parser.add_argument("--volume", default="t1/S06_brainchop_t1_crop.nii.gz")
    parser.add_argument("--shape", default=None, help="synthetic volume shape instead")
    args = parser.parse_args()
    if args.threads:
        configure_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        case = make_case(args, Path(tmp))
        model = load_generator_files(case.weights, None).generator(1.0, "cpu").model
    patch = head_patches(case, TileGrid(case.normalised.shape), 1)  # type: ignore[arg-type]
    x = torch.from_numpy(np.ascontiguousarray(patch))[:, None]
    nets = {name: prepare_network(model, options) for name, options in VARIANTS.items()}
    print(
        f"{case.source}, RRDG {case.network.params}, one 64x40x64 patch, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__} ({load_average()})"
    )
    seconds: dict[str, list[float]] = {name: [] for name in nets}
    with torch.inference_mode():
        for net in nets.values():
            net(x)
        for _ in range(args.rounds):
            for name, net in nets.items():
                start = time.perf_counter()
                net(x)
                seconds[name].append(time.perf_counter() - start)
    print(f"({load_average()})")
    plain = statistics.median(seconds["plain"])
    print(f"{'variant':<14}{'median s':>9}{'best s':>8}{'speed-up vs plain':>19}  runs")
    for name, values in seconds.items():
        runs = " ".join(f"{v:.2f}" for v in values)
        median = statistics.median(values)
        print(f"{name:<14}{median:>9.2f}{min(values):>8.2f}{plain / median:>18.2f}x  {runs}")
    print("speed-up vs plain: plain's median s / the variant's median s, in this run")


if __name__ == "__main__":
    main()
