"""The report's PNG figures: boxplots of every metric and, per subject, an axial slice.

Apart from the CSV and JSON files because only these need matplotlib (imported when drawing).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from mrisr_cli.evaluation_results import Evaluation, PairResult
from mrisr_cli.volumes import atomic_path


def _save_figure(figure: Any, path: Path, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def write_figures(evaluation: Evaluation, folder: Path, *, overwrite: bool) -> list[Path]:
    """``boxplots.png`` (one panel per metric, methods side by side) and, for the first
    subjects, ``slices_<subject>.png`` (reference, prediction, |difference| per method).

    Matplotlib's object API (no pyplot): no global state, no GUI backend, safe in workers.
    """
    written: list[Path] = []
    path = folder / "boxplots.png"
    figure = _boxplot_figure(evaluation)
    if figure is not None:
        _save_figure(figure, path, overwrite)
        written.append(path)
    subjects = sorted({r.subject for r in evaluation.results if r.preview is not None})
    for subject in subjects:
        rows = [r for r in evaluation.results if r.subject == subject and r.preview is not None]
        path = folder / f"slices_{_safe(subject)}.png"
        _save_figure(_slice_figure(subject, rows), path, overwrite)
        written.append(path)
    return written


def _boxplot_figure(evaluation: Evaluation) -> Any:
    from matplotlib.figure import Figure

    panels = []
    for metric in evaluation.metrics:
        data = []
        for name in evaluation.methods:
            values = [
                r.values.get(metric.key, math.nan)
                for r in evaluation.results
                if r.method == name and not r.error
            ]
            data.append([v for v in values if math.isfinite(v)])
        if any(data):
            panels.append((metric, data))
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    width = max(2.6, 1.1 + 1.2 * len(evaluation.methods))
    figure = Figure(figsize=(width * columns, 3.4 * rows), layout="constrained")
    rng = np.random.default_rng(0)
    names = list(evaluation.methods)
    for index, (metric, data) in enumerate(panels):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.boxplot([d if d else [math.nan] for d in data], showmeans=True, showfliers=False)
        axis.set_xticks(range(1, len(names) + 1), names, fontsize=8)
        for i, values in enumerate(data, start=1):
            axis.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=8, alpha=0.6)
        if metric.higher_is_better is not None:
            better = "higher" if metric.higher_is_better else "lower"
            title = f"{metric.label} ({better} is better)"
        elif metric.ideal is not None:
            title = f"{metric.label} ({metric.ideal:g} is ideal)"
        else:
            title = metric.label
        test = evaluation.comparison.get(metric.key)
        if test and math.isfinite(test.p):
            title += f"\npaired t-test p = {test.p:.3g} (n = {test.n})"
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.grid(axis="y", alpha=0.3)
    return figure


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _slice_figure(subject: str, results: list[PairResult]) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.3 * len(results)), layout="constrained")
    axes = figure.subplots(len(results), 3, squeeze=False)
    diffs = [np.abs(r.preview["ref"] - r.preview["pred"]) for r in results if r.preview]
    top = max(float(np.percentile(d, 99.9)) for d in diffs) or 1e-6  # one scale for all rows
    for row, result, diff in zip(axes, results, diffs, strict=True):
        assert result.preview is not None
        ref, pred = result.preview["ref"], result.preview["pred"]
        psnr, ssim = result.values.get("psnr", math.nan), result.values.get("ssim", math.nan)
        for axis, image, title, kwargs in (
            (row[0], ref, "reference", {"cmap": "gray", "vmin": 0, "vmax": 1}),
            (
                row[1],
                pred,
                f"{result.method}: PSNR {psnr:.2f}, SSIM {ssim:.4f}",
                {"cmap": "gray", "vmin": 0, "vmax": 1},
            ),
            (row[2], diff, "|reference - prediction|", {"cmap": "magma", "vmin": 0, "vmax": top}),
        ):
            shown = axis.imshow(image.T, origin="lower", **kwargs)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        figure.colorbar(shown, ax=row[2], fraction=0.046)
    figure.suptitle(
        f"{subject}: axial slice, intensities scaled by the reference's min-max", fontsize=10
    )
    return figure
