"""Training throughput of the full RRDG on 64x40x64 patches: patches/s, peak memory, data wait.

Runs the real training step (:meth:`mrisr_cli.training.Trainer.step`, PSNR stage) on batches from
the real patch sampler and read-ahead threads, on a prepared data folder (``--data``) or, without
one, on two synthetic phantom heads prepared in a temporary folder. Configurations:

- on a GPU: gradient checkpointing on/off x AMP on/off, each at the largest batch that fits
  (found by doubling until CUDA runs out of memory) unless ``--batch`` is given;
- on the CPU: checkpointing on, then off, batch 1, few steps: a full-RRDG patch is ~0.87 TFLOP
  forward, so one training step takes minutes on two cores.

The first configuration is `mrisr train`'s default on that device (checkpointing on; AMP on a GPU,
off on the CPU) and is the reference: every row gives its patches/s over the reference's, measured
in the same process (a speed-up; on a GPU the batch sizes may differ, so patches/s, not s/step).
Peak memory is per configuration: the GPU's peak allocated memory, or the process's resident
memory sampled every 20 ms while that configuration's steps run.

Usage::

    python benchmarks/bench_train.py                     # auto device
    python benchmarks/bench_train.py --device cpu --steps 1 --warmup 0
    python benchmarks/bench_train.py --device cuda --steps 20 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from bench_upsample import PeakRss

from mrisr_cli.degradation import DegradationConfig
from mrisr_cli.inference import resolve_device
from mrisr_cli.manifest import load_manifest
from mrisr_cli.networks import NetworkConfig, build_network, count_parameters
from mrisr_cli.patches import PatchOptions, PatchSampler, Prefetcher, open_split
from mrisr_cli.prepare import PrepareOptions, prepare_dataset
from mrisr_cli.selftest import phantom
from mrisr_cli.threads import configure_threads
from mrisr_cli.training import Trainer
from mrisr_cli.training_config import TrainConfig
from mrisr_cli.volumes import save_volume

PHANTOM_SHAPE = (144, 176, 144)


def synthetic_data(root: Path) -> Path:
    """Two phantom heads through `prepare` (no N4): one train, one val subject."""
    src = root / "src"
    src.mkdir(parents=True)
    for seed in range(2):
        head = phantom(PHANTOM_SHAPE, seed=seed) * 4.0
        save_volume(src / f"sub-{seed:02d}_T1w.nii.gz", head, torch.eye(4).double().numpy())
    prepare_dataset(src, root / "data", PrepareOptions(DegradationConfig(n4=False)))
    return root / "data"


def measure(
    config: TrainConfig, device: str, sampler: PatchSampler, warmup: int, steps: int, workers: int
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` ones; batches come through read-ahead."""
    trainer = Trainer(config, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def fetch(key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = sampler.batch(key, config.batch_size)
        pair = (torch.from_numpy(lr), torch.from_numpy(hr))
        return (pair[0].pin_memory(), pair[1].pin_memory()) if cuda else pair

    keys = [(s, 0) for s in range(warmup + steps)]
    with PeakRss().watch() as rss, Prefetcher(fetch, keys, depth=4, workers=workers) as prefetch:
        batches = (
            (lr.to(device, non_blocking=True), hr.to(device, non_blocking=True))
            for lr, hr in prefetch
        )
        for step in range(warmup):
            trainer.step(step, batches)
        if cuda:
            torch.cuda.synchronize()
        waited = prefetch.wait_seconds
        started = time.perf_counter()
        last: dict[str, Any] = {}
        for step in range(warmup, warmup + steps):
            last = trainer.step(step, batches)
            float(last["l1"])  # wait for the step, as training does when it logs the loss
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        wait = prefetch.wait_seconds - waited
    result = {
        "device": device,
        "checkpointing": config.checkpointing,
        "amp": trainer.use_amp,
        "batch": config.batch_size,
        "steps": steps,
        "seconds_per_step": elapsed / steps,
        "patches_per_second": config.batch_size * steps / elapsed,
        "data_wait_fraction": wait / elapsed,
        "l1": float(last["l1"]),
    }
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_rss_gib"] = rss.peak / 2**30
    del trainer
    return result


def fits(config: TrainConfig, device: str, sampler: PatchSampler) -> bool:
    """One training step at this batch size without running out of GPU memory."""
    try:
        measure(config, device, sampler, warmup=1, steps=1, workers=1)
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()
    return True


def largest_batch(base: TrainConfig, device: str, sampler: PatchSampler, cap: int) -> int:
    """Double the batch until a step runs out of memory; the last one that fitted."""
    batch = 1
    while batch * 2 <= cap and fits(replace(base, batch_size=batch * 2), device, sampler):
        batch *= 2
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, help="prepared data folder (default: phantoms)")
    parser.add_argument("--batch", type=int, help="batch size (default: largest that fits)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 GPU, 1 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps (default: 3 GPU, 0 CPU)")
    parser.add_argument("--patch", default="64,40,64")
    parser.add_argument("--net-params", default="{}", help="RRDG parameters (default: paper's)")
    parser.add_argument("--workers", type=int, default=2, help="read-ahead threads")
    parser.add_argument("--threads", type=int, help="CPU threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    threads = configure_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    steps = args.steps or (20 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    patch = tuple(int(p) for p in args.patch.split(","))
    network = NetworkConfig("rrdg", json.loads(args.net_params))
    with tempfile.TemporaryDirectory(prefix="mrisr-bench-") as tmp:
        data = args.data or synthetic_data(Path(tmp))
        subjects = open_split(load_manifest(data), "train")
        sampler = PatchSampler(subjects, PatchOptions(patch), seed=0)  # type: ignore[arg-type]
        # (checkpointing, amp); the first is `mrisr train`'s default here and the reference
        variants = [(True, False), (False, False)]
        if cuda:
            variants = [(True, True), (False, True), (True, False), (False, False)]
        params = count_parameters(build_network(network))
        print(
            f"RRDG {network.params or '(paper)'}: {params:,} parameters; patch "
            f"{'x'.join(map(str, patch))}; device {device}"
            + ("" if cuda else f" ({threads} threads)")
        )
        print(
            f"reference: checkpointing on, amp {'on' if cuda else 'off'} (the default here); "
            "'x reference' = patches/s over the reference's, this run"
            + (
                "; --warmup 0: the first row's steps include first-call costs"
                if warmup == 0
                else ""
            )
        )
        results = []
        for checkpointing, amp in variants:
            base = TrainConfig(
                stage="psnr",
                data=str(data),
                out=tmp,
                network=network,
                patch=patch,  # type: ignore[arg-type]
                batch_size=args.batch or 1,
                checkpointing=checkpointing,
                amp=amp,
                device=device,
            )
            if cuda and args.batch is None:
                base = replace(
                    base, batch_size=largest_batch(base, device, sampler, args.max_batch)
                )
            result = measure(base, device, sampler, warmup, steps, args.workers)
            results.append(result)
            result["speedup_vs_reference"] = (
                result["patches_per_second"] / results[0]["patches_per_second"]
            )
            memory = (
                f"peak GPU {result['peak_gpu_memory_gib']:.2f} GiB"
                if cuda
                else f"peak RSS {result['peak_rss_gib']:.2f} GiB"
            )
            print(
                f"checkpointing {'on ' if checkpointing else 'off'} amp {'on ' if amp else 'off'} "
                f"batch {result['batch']:3d}: {result['seconds_per_step']:8.2f} s/step "
                f"{result['patches_per_second']:8.3f} patches/s  data wait "
                f"{100 * result['data_wait_fraction']:5.1f}%  {memory}  "
                f"{result['speedup_vs_reference']:5.2f} x reference",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
