"""Train the shipped weights and measure the comparison table, in one budgeted GPU session.

What it does, each stage under a deadline so that the whole fits one call of a lent GPU (or one
SLURM slot), each result written to --out as soon as it exists:

1. unpack a dataset pack (:mod:`mrisr_cli.compact`) into a `mrisr train` data folder;
2. RRDG, PSNR stage, for --psnr-seconds (validation every --val-every steps, best kept);
3. 3D FSRCNN, 3D SRResNet and mDCSRN, PSNR stage, with RRDG's schedule: the same data, batch,
   learning rate and number of steps (with --continue-from, up to RRDG's total steps across
   calls; each also capped in time: 1.5x RRDG's time for as many steps, and the
   deadline; with --tiny by the deadline only, so the dry run on a loaded CPU, where a tiny
   baseline's start-up can outlast RRDG's few seconds, still runs the whole schedule);
4. RRDG, GAN stage from the best PSNR weights, for --gan-seconds or what the deadline leaves;
5. the test split: LR input, cubic B-spline of the true LR volume, every network, the GAN model
   and the alpha=0.5 blend, through `mrisr upsample`'s code path (seconds per volume measured),
   scored by `mrisr evaluate`'s code (PSNR, SSIM, NRMSE, M_h and Dice with HighRes3DNet);
6. the figure: one coronal slice (a degraded plane) of each.

    python tools/train_release.py --pack carry/pack --out $OUT --work /tmp/release \\
        --parcellation carry/highres3dnet.pth --deadline 560

``--tiny`` swaps in tiny networks and short budgets: the CPU dry run of the same script.
``--skip-eval`` stops after training (steps 1-4): for a dry run of ``--continue-from``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tarfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrisr_cli.compact import degrade_zscores, unpack_dataset
from mrisr_cli.intensity import IntensityStats
from mrisr_cli.manifest import load_manifest
from mrisr_cli.networks import NetworkConfig, build_network, count_parameters
from mrisr_cli.run_files import CRITIC_NAME, read_log
from mrisr_cli.training import stage_steps_of, train
from mrisr_cli.training_config import CRITIC_LR_PER_LR, TrainConfig

TINY = {
    "rrdg": {"features": 4, "blocks": 1, "growth": 2},
    "fsrcnn": {"d": 4, "s": 2, "m": 1},
    "srresnet": {"features": 4, "blocks": 1, "outer_kernel": 3},
    "mdcsrn": {"growth": 2, "blocks": 1, "units": 2},
}
BASELINES = ("fsrcnn", "srresnet", "mdcsrn")
STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def log(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def train_stage(
    name: str, base: TrainConfig, out: Path, results: dict, **changes: Any
) -> dict[str, Any]:
    """One training run; if it fails under mixed precision, once more in fp32 (a fresh folder)."""
    try:
        return _train_stage(name, base, out, results, **changes)
    except Exception:
        if changes.get("amp") is False:
            raise
        results.setdefault("failures", {})[name] = traceback.format_exc()
        log(f"{name} failed, retrying without AMP:\n{results['failures'][name]}")
        limit = changes.get("time_limit")
        if limit:
            changes["time_limit"] = 0.6 * limit
        return _train_stage(name + "_fp32", base, out, results, amp=False, **changes)


def _train_stage(
    name: str, base: TrainConfig, out: Path, results: dict, **changes: Any
) -> dict[str, Any]:
    config = replace(base, out=str(out / name), **changes)
    started = time.perf_counter()
    peak = None
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(config)
    seconds = time.perf_counter() - started
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    records = read_log(out / name / "log.jsonl")
    epochs = [r for r in records if r["event"] == "epoch"]
    patches = (
        result.step * config.batch_size * (config.critic_steps if config.stage == "gan" else 1)
    )
    entry = {
        "network": config.network.name,
        "stage": config.stage,
        "status": result.status,
        "steps": result.step,
        "seconds": round(seconds, 1),
        "patches_per_second": [round(r["patches_per_second"], 2) for r in epochs],
        "generator_patches": result.step * config.batch_size,
        "patches_drawn": patches,
        "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        "best_val_psnr": result.best_psnr,
        "validation": [
            {k: v for k, v in r.items() if k.startswith("val_") or k in ("step", "best")}
            for r in epochs
        ],
        "best": str(result.best_weights) if result.best_weights else None,
        "last": str(result.last_weights) if result.last_weights else None,
        "config": config.as_dict(),
    }
    results["training"][name] = entry
    log(
        f"{name}: {result.status} after {result.step} steps, {seconds:.0f} s, best val PSNR "
        f"{result.best_psnr}, peak GPU {entry['peak_gpu_gib']} GiB"
    )
    return entry


def weights_in(folders: list[Path], name: str) -> Path:
    """``name``'s file in folders of earlier weights: the first ``FOLDER/NAME.safetensors`` that
    exists (the repository keeps RRDG's in weights/, the baselines' in tools/baseline_weights/),
    else the first folder's, missing."""
    paths = [folder / f"{name}.safetensors" for folder in folders]
    return next((path for path in paths if path.is_file()), paths[0])


def write_test_volumes(data_dir: Path, work: Path, split: str) -> list[str]:
    """hr/, lr/ (the network input) and bspline/ (cubic B-spline of the true LR volume)."""
    import nibabel as nib

    manifest = load_manifest(data_dir)
    cubic = replace(manifest.degradation, interpolation="cubic")
    names = []
    for record in manifest.split(split):
        folder = data_dir / "subjects" / record["id"]
        affine = np.asarray(record["affine"], dtype=float)
        hr = np.load(folder / "hr.npy").astype(np.float32)
        lr = np.load(folder / "lr.npy").astype(np.float32)
        name = f"{record['id']}.nii.gz"
        stats = IntensityStats(record["intensity"]["mean"], record["intensity"]["std"])
        spline = degrade_zscores(hr, cubic, affine, stats)
        for kind, data in (
            ("hr", hr),
            ("lr", lr),
            ("bspline", spline),
        ):
            (work / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(work / kind / name))
        names.append(name)
    return names


def run_methods(
    methods: dict[str, tuple[Path, Path | None, float]], work: Path, device: str, half: bool
) -> dict[str, Any]:
    """Upsample every test LR volume with every method; seconds per volume each."""
    from mrisr_cli.inference import InferenceOptions
    from mrisr_cli.pipeline import UpsampleOptions, load_generator_files, upsample_file

    timings: dict[str, Any] = {}
    inputs = sorted((work / "lr").glob("*.nii.gz"))
    options = UpsampleOptions(
        inference=InferenceOptions(
            device=device, half=half, batch_size=16 if device != "cpu" else 4
        ),
        n4=False,  # the test volumes were N4-corrected when prepared
        overwrite=True,
        sidecar=False,
    )
    for method, (psnr, gan, alpha) in methods.items():
        files = load_generator_files(psnr, gan)
        generator = files.generator(alpha, device)
        (work / method).mkdir(exist_ok=True)
        seconds = []
        try:
            for path in inputs:
                result = upsample_file(path, work / method / path.name, generator, options)
                seconds.append(result.seconds)
        except Exception:
            if not options.inference.half:
                raise
            log(f"{method}: half precision failed, fp32 instead:\n{traceback.format_exc()}")
            options = replace(options, inference=replace(options.inference, half=False))
            seconds = []
            for path in inputs:
                result = upsample_file(path, work / method / path.name, generator, options)
                seconds.append(result.seconds)
        totals = [t["total"] for t in seconds]
        timings[method] = {"seconds": seconds, "mean": float(np.mean(totals))}
        log(f"upsampled test split with {method}: {np.mean(totals):.2f} s/volume")
    return timings


def evaluate_all(
    work: Path, methods: list[str], report: Path, weights: Path | None, device: str
) -> dict:
    from mrisr_cli.evaluation import EvaluationOptions, evaluate
    from mrisr_cli.evaluation_report import summary_dict, write_report
    from mrisr_cli.fidelity import read_label_names

    options = EvaluationOptions(weights=weights, tissue=False, n4=False, device=device)
    evaluation = evaluate(work / "hr", [work / m for m in methods], options=options, previews=0)
    labels = read_label_names(weights) if weights else None
    write_report(evaluation, report, overwrite=True, label_names=labels)
    return summary_dict(evaluation)


def figure(work: Path, methods: list[tuple[str, str]], path: Path) -> None:
    """One coronal slice (axes 0 and 2 are the degraded ones) of the first test subject."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    name = sorted((work / "hr").glob("*.nii.gz"))[0].name
    hr = np.asarray(nib.load(str(work / "hr" / name)).dataobj, dtype=np.float32)
    j = hr.shape[1] // 2
    lo, hi = np.percentile(hr, [1, 99.5])
    x0, z0 = hr.shape[0] // 2 - 30, hr.shape[2] // 2 - 10
    fig, axes = plt.subplots(2, len(methods), figsize=(2.2 * len(methods), 4.6))
    for col, (folder, label) in enumerate(methods):
        data = np.asarray(nib.load(str(work / folder / name)).dataobj, dtype=np.float32)
        plane = np.rot90(data[:, j, :])
        axes[0, col].imshow(plane, cmap="gray", vmin=lo, vmax=hi)
        axes[0, col].set_title(label, fontsize=8)
        zoom = np.rot90(data[x0 : x0 + 60, j, z0 : z0 + 60])
        axes[1, col].imshow(zoom, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        for row in (0, 1):
            axes[row, col].axis("off")
    fig.suptitle(
        f"{name.split('.')[0]}, coronal slice {j} (degraded plane); bottom: 60x60 mm zoom",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--parcellation", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--deadline", type=float, default=560.0, help="seconds for everything")
    parser.add_argument("--psnr-seconds", type=float, default=140.0)
    parser.add_argument("--gan-seconds", type=float, default=60.0)
    parser.add_argument(
        "--eval-seconds",
        type=float,
        default=200.0,
        help="kept for steps 5-6 (on an H200 with --half-eval and --parcellation: 177 s)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--gan-lr", type=float, default=5e-5)
    parser.add_argument("--critic-steps", type=int, default=2)
    parser.add_argument("--critic-warmup", type=int, default=20)
    parser.add_argument("--val-every", type=int, default=150)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--half-eval", action="store_true", help="fp16 inference on the test split")
    parser.add_argument("--tiny", action="store_true", help="tiny networks: the CPU dry run")
    parser.add_argument(
        "--skip-eval", action="store_true", help="train only: no test split, evaluation, figure"
    )
    parser.add_argument(
        "--trained",
        type=Path,
        nargs="+",
        help="folders with rrdg_psnr.safetensors and baseline weights from an earlier call (each "
        "file from the first folder that has it): the PSNR stage and the baselines are not "
        "trained again (GAN stage and evaluation only; with --gan-seconds 0 the "
        "rrdg_gan.safetensors found is evaluated, nothing trains)",
    )
    parser.add_argument(
        "--continue-gan",
        type=Path,
        nargs=2,
        metavar=("GAN", "CRITIC"),
        help="with --trained: an earlier call's GAN file and its critic (rrdg_gan/"
        "critic.safetensors in its runs.tar.gz, rrdg_gan_fp32/ after an fp32 retry); the GAN "
        "stage goes on from both (no critic warm-up) instead of starting from the PSNR file, "
        "so its steps add up across sessions",
    )
    parser.add_argument(
        "--continue-from",
        type=Path,
        nargs="+",
        help="folders with rrdg_psnr.safetensors and baseline weights from an earlier call (each "
        "file from the first folder that has it; e.g. weights tools/baseline_weights): every "
        "PSNR-stage network starts from its file (the schedule adds up across GPU sessions)",
    )
    args = parser.parse_args()
    if args.continue_gan is not None:
        if args.trained is None or args.gan_seconds <= 0:
            parser.error("--continue-gan needs --trained and --gan-seconds above 0")
        from mrisr_cli.errors import MrisrError
        from mrisr_cli.pipeline import load_generator_files

        # the GAN file must be tuned from the PSNR file it will be blended with
        try:
            psnr_file = weights_in(args.trained, "rrdg_psnr")
            problems = load_generator_files(psnr_file, args.continue_gan[0]).warnings()
        except MrisrError as exc:
            problems = [str(exc)]
        if problems:
            parser.error(f"--continue-gan: {problems[0]}")

    import torch

    from mrisr_cli.inference import resolve_device

    device = resolve_device(args.device)
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"training": {}, "device": device, "args": vars(args)}
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(0)
    results["torch"] = torch.__version__

    def save() -> None:
        write_json(out / "results.json", results)

    data = work / "data"
    manifest = unpack_dataset(args.pack, data, jobs=args.jobs)
    results["counts"] = manifest["counts"]
    results["splits"] = {s["id"]: s["split"] for s in manifest["subjects"]}
    log(f"unpacked {len(manifest['subjects'])} subjects: {manifest['counts']}")
    save()

    params = (lambda n: TINY[n]) if args.tiny else (lambda n: {})
    runs = work / "runs"
    base = TrainConfig(
        stage="psnr",
        data=str(data),
        out="",
        network=NetworkConfig("rrdg", params("rrdg")),
        critic=NetworkConfig(
            "patch_discriminator", {"base_features": 4, "plain_layers": 0} if args.tiny else {}
        ),
        epochs=1000,
        steps_per_epoch=args.val_every,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay_steps=10**9,  # a schedule this short keeps one rate
        checkpointing=False,
        device=device,
        workers=args.workers,
        prefetch=2 * args.workers,
        log_every=10,
        # the dry run recalibrates BatchNorm on 4 patches, not 32: most of its validation time
        **({"precise_bn": 4} if args.tiny else {}),
    )

    def guarded(name: str, stage: Any) -> Any:
        try:
            return stage()
        except Exception:
            results.setdefault("errors", {})[name] = traceback.format_exc()
            log(f"{name} failed:\n{results['errors'][name]}")
            return None
        finally:
            save()

    def train_gan(base: TrainConfig, init: Path, seconds: float) -> None:
        """The GAN stage from ``init`` (or ``--continue-gan``'s files) for ``seconds``; its last
        weights are the shipped ones, and its critic comes back for the next session."""
        critic_init, warmup = None, args.critic_warmup
        if args.continue_gan is not None:
            init, critic = args.continue_gan
            critic_init, warmup = str(critic), 0
        gan = guarded(
            "rrdg_gan",
            lambda: train_stage(
                "rrdg_gan",
                base,
                runs,
                results,
                stage="gan",
                init=str(init),
                lr=args.gan_lr,
                critic_lr=CRITIC_LR_PER_LR * args.gan_lr,
                critic_steps=args.critic_steps,
                critic_warmup=warmup,
                critic_init=critic_init,
                time_limit=seconds,
            ),
        )
        if gan is not None:
            shutil.copy(Path(gan["last"]), out / "rrdg_gan.safetensors")

    def earlier(name: str) -> str | None:
        """``--continue-from``'s file for ``name``, recorded in the results (None: from scratch,
        also where no folder has a file for it: a network new to the comparison)."""
        if args.continue_from is None:
            return None
        path = weights_in(args.continue_from, name)
        continued = results.setdefault("continued_from", {})
        if not path.is_file():
            continued[name] = {"path": None, "steps_before": 0}
            return None
        from mrisr_cli.weights import load_weights

        previous = load_weights(path)
        continued[name] = {
            "path": str(path),
            "sha256": previous.sha256,
            "steps_before": stage_steps_of(previous),
        }
        return str(path)

    def steps_before(name: str) -> int:
        return int(results.get("continued_from", {}).get(name, {}).get("steps_before", 0))

    if args.trained is not None:
        for name in ("rrdg_psnr", *BASELINES, "rrdg_gan"):
            if weights_in(args.trained, name).is_file():
                shutil.copy(weights_in(args.trained, name), out / f"{name}.safetensors")
        if args.gan_seconds > 0:  # else the folder's GAN model, if any, is evaluated as it is
            train_gan(base, out / "rrdg_psnr.safetensors", args.gan_seconds)
        entry = None
    else:
        entry = guarded(
            "rrdg_psnr",
            lambda: train_stage(
                "rrdg_psnr",
                base,
                runs,
                results,
                time_limit=args.psnr_seconds,
                init=earlier("rrdg_psnr"),
            ),
        )
    if entry is not None:
        # RRDG's schedule so far, this call's steps and those behind its --continue-from file;
        # each baseline trains up to the same total
        steps = entry["steps"] + steps_before("rrdg_psnr")
        per_step = entry["seconds"] / max(entry["steps"], 1)

        def baseline_cap(net: str, steps: int) -> float:
            """1.5x RRDG's time for the same steps: each baseline is cheaper per step."""
            return 1.5 * per_step * (steps - steps_before(net))

        best = Path(entry["best"] or entry["last"])
        shutil.copy(best, out / "rrdg_psnr.safetensors")
        base = replace(base, amp=entry["config"]["amp"])  # the fp32 fallback holds for all
        for net in BASELINES:
            left = args.deadline - args.eval_seconds - elapsed()
            init = earlier(net)
            if steps - steps_before(net) < 1:
                log(f"{net}: already at {steps_before(net)} steps, RRDG's {steps}")
                results["training"][net] = {"status": "skipped (schedule done)"}
                shutil.copy(Path(str(init)), out / f"{net}.safetensors")
                continue
            if left < 15:
                log(f"{net}: skipped, {left:.0f} s left before the evaluation")
                results["training"][net] = {"status": "skipped (deadline)"}
                continue
            trained = guarded(
                net,
                lambda net=net, left=left, init=init: train_stage(
                    net,
                    base,
                    runs,
                    results,
                    network=NetworkConfig(net, params(net)),
                    init=init,
                    epochs=1,
                    steps_per_epoch=steps - steps_before(net),
                    time_limit=left if args.tiny else min(left, baseline_cap(net, steps)),
                ),
            )
            if trained is not None:
                shutil.copy(Path(trained["last"]), out / f"{net}.safetensors")
        # the GAN stage last, with what the deadline leaves of --gan-seconds: the comparison
        # needs the baselines' whole schedule first
        gan_seconds = min(args.gan_seconds, args.deadline - args.eval_seconds - elapsed() - 20)
        if gan_seconds >= 5:
            train_gan(base, best, gan_seconds)

    # --- the test split -----------------------------------------------------------------------
    if args.skip_eval:
        log("--skip-eval: no test split, evaluation or figure")
    else:
        try:
            names = write_test_volumes(data, work, "test")
            log(f"test split: {names}")
            methods: dict[str, tuple[Path, Path | None, float]] = {}
            psnr_w, gan_w = out / "rrdg_psnr.safetensors", out / "rrdg_gan.safetensors"
            for net in BASELINES:
                if (out / f"{net}.safetensors").is_file():
                    methods[net] = (out / f"{net}.safetensors", None, 1.0)
            if psnr_w.is_file():
                methods["rrdg_psnr"] = (psnr_w, None, 1.0)
            if psnr_w.is_file() and gan_w.is_file():
                methods["rrdg_gan"] = (psnr_w, gan_w, 0.0)
                methods["rrdg_blend_0.5"] = (psnr_w, gan_w, 0.5)
            results["seconds_per_volume"] = run_methods(methods, work, device, args.half_eval)
            results["parameters"] = {
                net: count_parameters(build_network(NetworkConfig(net, params(net))))
                for net in ("rrdg", *BASELINES)
            }
            save()
            order = ["lr", "bspline", *methods]
            pack_logs(runs, work, out)
            results["evaluation_images"] = evaluate_all(work, order, work / "images", None, device)
            save()
            log("image metrics done")
            labels = {
                "lr": "LR input",
                "bspline": "B-spline",
                "fsrcnn": "FSRCNN",
                "srresnet": "SRResNet",
                "mdcsrn": "mDCSRN",
                "rrdg_psnr": "RRDG PSNR",
                "rrdg_gan": "RRDG GAN",
                "rrdg_blend_0.5": "alpha=0.5",
                "hr": "HR",
            }
            shown = [(m, labels[m]) for m in ["lr", *methods, "hr"] if m in labels]
            figure(work, shown, work / "comparison.png")
            log("figure written")
            if args.parcellation is not None:
                results["evaluation"] = evaluate_all(
                    work, order, work / "evaluation", args.parcellation, device
                )
                log("parcellation metrics done")
        except Exception:
            results["eval_error"] = traceback.format_exc()
            log(results["eval_error"])
    results["total_seconds"] = round(elapsed(), 1)
    save()
    pack_logs(runs, work, out)
    print_table(results)
    return 0


def pack_logs(runs: Path, work: Path, out: Path) -> None:
    """Logs, the figure, the reports and the GAN stage's critic (5 MB, for ``--continue-gan``)
    in one file: a lent GPU sends back 8 files at most."""
    with tarfile.open(out / "runs.tar.gz.part", "w:gz") as tar:
        for run in sorted(runs.glob("*")):
            for name in ("log.jsonl", "run.json", CRITIC_NAME):
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"{run.name}/{name}")
        if (work / "comparison.png").is_file():
            tar.add(work / "comparison.png", arcname="comparison.png")
        for folder, name in ((work / "evaluation", "evaluation"), (work / "images", "images")):
            if folder.is_dir():
                tar.add(folder, arcname=name)
    (out / "runs.tar.gz.part").replace(out / "runs.tar.gz")


def print_table(results: dict) -> None:
    print("\nstage        status      steps  seconds  val PSNR  peak GiB")
    for name, e in results["training"].items():
        if "steps" in e:
            print(
                f"{name:<12} {e['status']:<11} {e['steps']:>5} {e['seconds']:>8} "
                f"{e['best_val_psnr'] or math.nan:>9.2f} {e['peak_gpu_gib']}"
            )
    evaluation = results.get("evaluation") or results.get("evaluation_images")
    if evaluation:
        keys = [m["key"] for m in evaluation["metrics"]]
        print("method          " + " ".join(f"{k:>14}" for k in keys))
        for name, m in evaluation["methods"].items():
            cells = []
            for k in keys:
                s = m["metrics"].get(k, {})
                cells.append(f"{s.get('mean') or math.nan:8.4f}±{s.get('std') or math.nan:<5.3f}")
            print(f"{name:<15} " + " ".join(f"{c:>14}" for c in cells))
    print(json.dumps(results.get("seconds_per_volume", {}), default=str)[:600])


if __name__ == "__main__":
    sys.exit(main())
