"""The records of an evaluation: metric columns, one pair's numbers, summaries, the whole run.

The scoring, the statistics, the report files and the CLI table all read these; they live in a
module of their own so that each of those can import them without importing another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrisr_cli.pairing import Pairing


@dataclass(frozen=True)
class MetricInfo:
    """A column of the report: key, label in the table, and which direction is better.

    ``higher_is_better`` None: neither direction is, the value closest to ``ideal`` is (HF
    power: 1, the reference's own). Such a metric is summarised and tested like the others, but
    no method is named better, since a difference of means says nothing about which is nearer.
    """

    key: str
    label: str
    higher_is_better: bool | None
    ideal: float | None = None

    @property
    def direction(self) -> str:
        """How the table's header says which values are better: an arrow, or the ideal."""
        if self.higher_is_better is None:
            return f"→{self.ideal:g}" if self.ideal is not None else ""
        return "↑" if self.higher_is_better else "↓"


METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("ssim", "SSIM", True),
    MetricInfo("psnr", "PSNR", True),
    MetricInfo("nrmse", "NRMSE", False),
    MetricInfo("ssim_mask", "SSIM (mask)", True),
    MetricInfo("psnr_mask", "PSNR (mask)", True),
    MetricInfo("nrmse_mask", "NRMSE (mask)", False),
    MetricInfo("hf_power", "HF power", None, ideal=1.0),
    MetricInfo("hf_corr", "HF corr", True),
    MetricInfo("tissue_dice", "Tissue Dice", True),
    MetricInfo("mh", "M_h", False),
    MetricInfo("parc_dice", "Dice", True),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


@dataclass
class PairResult:
    """The numbers for one (method, subject) pair, or the reason there are none."""

    method: str
    subject: str
    ref: str
    pred: str
    values: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)
    dice_labels: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    notes: tuple[str, ...] = ()
    preview: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class MetricSummary:
    """Mean and sample standard deviation (ddof=1) over subjects with a finite value."""

    mean: float
    std: float
    n: int
    n_infinite: int = 0


@dataclass(frozen=True)
class PairedTest:
    """Paired two-tailed t-test of one metric between the two methods.

    ``better`` names the method with the better mean only when the difference is significant
    (``p`` < :data:`~mrisr_cli.evaluation_stats.SIGNIFICANCE_LEVEL`) and the metric has a
    better direction; otherwise it is None, and ``mean_difference`` still gives the direction.
    """

    n: int
    mean_difference: float  # first method minus second
    t: float
    p: float
    better: str | None
    significant: bool = False


@dataclass
class Evaluation:
    """Results of a whole run, ready for the table and the report files."""

    ref_dir: Path
    methods: dict[str, Path]
    results: list[PairResult]
    pairings: dict[str, Pairing]
    metrics: tuple[MetricInfo, ...]
    summary: dict[str, dict[str, MetricSummary]] = field(default_factory=dict)
    comparison: dict[str, PairedTest] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # pairing -> how notes name its files
    alphas: dict[str, float | None] = field(default_factory=dict)  # methods of split folders

    @property
    def errors(self) -> list[PairResult]:
        return [r for r in self.results if r.error]

    @property
    def evaluated(self) -> list[PairResult]:
        return [r for r in self.results if not r.error]
