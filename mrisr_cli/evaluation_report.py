"""The files `mrisr evaluate --out` writes: subjects.csv, parcellation_dice.csv, summary.json.

Each goes through a temporary name and a rename, and files of an earlier report that this one
does not replace are removed; the PNG figures come from :mod:`mrisr_cli.evaluation_figures`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mrisr_cli import __version__
from mrisr_cli.errors import OutputError
from mrisr_cli.evaluation_figures import write_figures
from mrisr_cli.evaluation_results import Evaluation
from mrisr_cli.evaluation_stats import SIGNIFICANCE_LEVEL
from mrisr_cli.volumes import atomic_path

REPORT_FILES = ("subjects.csv", "summary.json", "parcellation_dice.csv")


def check_report_target(out_dir: Path, *, overwrite: bool) -> None:
    """Fail before any work if the report would replace files without --overwrite."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if overwrite or not out_dir.exists():
        return
    existing = [out_dir / n for n in REPORT_FILES if (out_dir / n).exists()]
    existing += sorted((out_dir / "figures").glob("*.png"))
    if existing:
        raise OutputError(f"{existing[0]}: already exists (use --overwrite to replace it)")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return buffer.getvalue()


def _write_text(path: Path, text: str, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_report(
    evaluation: Evaluation,
    out_dir: Path,
    *,
    overwrite: bool = False,
    label_names: dict[int, str] | None = None,
) -> list[Path]:
    """subjects.csv, summary.json, parcellation_dice.csv (with weights) and figures/*.png.

    Returns the paths written. Every file goes through a temporary name and a rename.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "figures").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the report folder ({exc.strerror})") from exc
    written: list[Path] = []

    detail_keys = sorted({k for r in evaluation.results for k in r.details}, key=_detail_order)
    keys = [m.key for m in evaluation.metrics]
    header = ["method", "subject", "reference", "prediction", *keys, *detail_keys, "error"]
    rows = [
        [r.method, r.subject, r.ref, r.pred]
        + [r.values.get(k, math.nan) for k in keys]
        + [r.details.get(k, math.nan) for k in detail_keys]
        + [r.error or ""]
        for r in evaluation.results
    ]
    path = out_dir / "subjects.csv"
    _write_text(path, _csv_text(header, rows), overwrite)
    written.append(path)

    if any(r.dice_labels for r in evaluation.results):
        names = label_names or {}
        label_rows = [
            [r.method, r.subject, label, names.get(label, ""), dice]
            for r in evaluation.results
            for label, dice in sorted(r.dice_labels.items())
        ]
        path = out_dir / "parcellation_dice.csv"
        _write_text(
            path, _csv_text(["method", "subject", "label", "name", "dice"], label_rows), overwrite
        )
        written.append(path)

    path = out_dir / "summary.json"
    _write_text(path, json.dumps(summary_dict(evaluation), indent=2) + "\n", overwrite)
    written.append(path)

    written += write_figures(evaluation, out_dir / "figures", overwrite=overwrite)
    # an earlier report's files that this one does not replace would mix two runs: remove them
    stale = [out_dir / n for n in REPORT_FILES] + sorted((out_dir / "figures").glob("*.png"))
    for path in stale:
        if path not in written:
            path.unlink(missing_ok=True)
    return written


def _detail_order(key: str) -> tuple[str, int]:
    stem, _, number = key.rpartition("_")
    return (stem, int(number) if number.isdigit() else 0)


def summary_dict(evaluation: Evaluation) -> dict[str, Any]:
    """The JSON summary: settings, counts, per-method statistics, the paired tests, notes."""
    methods = {}
    for name, folder in evaluation.methods.items():
        rows = [r for r in evaluation.results if r.method == name]
        methods[name] = {
            "folder": str(folder),
            "alpha": evaluation.alphas.get(name),  # set where the folder was split by alpha
            "pairs": len(rows),
            "evaluated": sum(1 for r in rows if not r.error),
            "errors": {r.subject: r.error for r in rows if r.error},
            "metrics": {
                k: {key: _finite_or_none(v) for key, v in asdict(s).items()}
                for k, s in evaluation.summary.get(name, {}).items()
            },
        }
    comparison = None
    if evaluation.comparison:
        first, second = list(evaluation.methods)
        comparison = {
            "first": first,
            "second": second,
            "significance_level": SIGNIFICANCE_LEVEL,
            "metrics": {
                k: {key: _finite_or_none(v) for key, v in asdict(t).items()}
                for k, t in evaluation.comparison.items()
            },
        }
    return {
        "mrisr_version": __version__,
        "reference": str(evaluation.ref_dir),
        "metrics": [
            {"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better}
            for m in evaluation.metrics
        ],
        "settings": evaluation.settings,
        "methods": methods,
        "comparison": comparison,
        "notes": evaluation.notes,
    }
