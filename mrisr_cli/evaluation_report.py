"""The files `mrisr evaluate --out` writes: subjects.csv, parcellation_dice.csv, summary.json.

Each goes through a temporary name and a rename, and files of an earlier report that this one
does not replace are removed (summary.json records which files are the report's: the user's own
files in the folder are left alone); the PNG figures come from
:mod:`mrisr_cli.evaluation_figures`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
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
RECORD_KEY = "report_files"  # summary.json's list of the files its report wrote
_FIGURE = re.compile(r"figures/[A-Za-z0-9._-]+\.png")  # evaluation_figures' names, no folders


def _recorded(out_dir: Path) -> list[str] | None:
    """The files an earlier report in ``out_dir`` wrote (relative names), as its summary.json
    records them; None where there is no such record (no report, or one written before reports
    kept it). Only names a report can have are taken: a record never reaches outside the folder."""
    try:
        record = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))[RECORD_KEY]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(record, list):
        return None
    return [n for n in record if isinstance(n, str) and (n in REPORT_FILES or _FIGURE.fullmatch(n))]


def report_files(out_dir: Path) -> list[Path]:
    """The existing files of an earlier report in ``out_dir``: its fixed names, and the figures
    its summary.json records (without a record, those named like the report's figures:
    boxplots.png, slices_*.png). Anything else there is the user's and is left alone."""
    out_dir = Path(out_dir)
    recorded = _recorded(out_dir)
    if recorded is None:
        figures = out_dir / "figures"
        recorded = [f"figures/{p.name}" for p in sorted(figures.glob("slices_*.png"))]
        recorded.append("figures/boxplots.png")
    names = dict.fromkeys([*REPORT_FILES, *recorded])  # ordered, once each
    return [out_dir / n for n in names if (out_dir / n).is_file()]


def check_report_target(out_dir: Path, *, overwrite: bool) -> None:
    """Fail before any work if the report would replace files without --overwrite: those of an
    earlier report (:func:`report_files`); other files in the folder do not matter."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    if overwrite or not out_dir.exists():
        return
    existing = report_files(out_dir)
    if existing:
        raise OutputError(
            f"{existing[0]}: already exists (a report's file; use --overwrite to replace the "
            "report's files)"
        )


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
    earlier = report_files(out_dir)  # before this report's summary.json replaces the record
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

    written += write_figures(evaluation, out_dir / "figures", overwrite=overwrite)

    path = out_dir / "summary.json"  # last: its record names every file of the report
    written.append(path)
    summary = summary_dict(evaluation)
    summary[RECORD_KEY] = [p.relative_to(out_dir).as_posix() for p in written]
    _write_text(path, json.dumps(summary, indent=2) + "\n", overwrite)
    # an earlier report's files that this one does not replace would mix two runs: remove them
    # (only the report's own, report_files: a file the user put in the folder stays)
    for path in earlier:
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
            {
                "key": m.key,
                "label": m.label,
                "higher_is_better": m.higher_is_better,  # null: neither, the nearest to ideal is
                "ideal": m.ideal,
            }
            for m in evaluation.metrics
        ],
        "settings": evaluation.settings,
        "methods": methods,
        "comparison": comparison,
        "notes": evaluation.notes,
    }
