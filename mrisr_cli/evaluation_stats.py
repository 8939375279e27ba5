"""Mean, std and the paired t-test that compare methods over subjects (the paper's Table 1).

Numbers in, numbers out: no files and no volumes, so the statistics can be checked on their own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from mrisr_cli.evaluation_results import MetricInfo, MetricSummary, PairedTest, PairResult

SIGNIFICANCE_LEVEL = 0.05  # a paired test names the better method only when p is below this


def summarise(
    results: Sequence[PairResult], methods: Sequence[str], metrics: Sequence[MetricInfo]
) -> dict[str, dict[str, MetricSummary]]:
    """Mean and std per method and metric; +inf (identical volumes) makes the mean inf."""
    summary: dict[str, dict[str, MetricSummary]] = {}
    for method in methods:
        rows = [r for r in results if r.method == method and not r.error]
        summary[method] = {}
        for metric in metrics:
            values = np.array([r.values.get(metric.key, math.nan) for r in rows], dtype=float)
            finite = values[np.isfinite(values)]
            n_inf = int(np.isinf(values).sum())
            if n_inf:
                mean = math.inf if np.all(values[np.isinf(values)] > 0) else math.nan
            else:
                mean = float(finite.mean()) if finite.size else math.nan
            std = float(finite.std(ddof=1)) if finite.size > 1 and not n_inf else math.nan
            summary[method][metric.key] = MetricSummary(mean, std, int(finite.size), n_inf)
    return summary


def paired_tests(
    results: Sequence[PairResult], first: str, second: str, metrics: Sequence[MetricInfo]
) -> dict[str, PairedTest]:
    """ttest_rel per metric over subjects with finite values for both methods; the better
    method is named only where p < :data:`SIGNIFICANCE_LEVEL`, and never for a metric without
    a better direction (HF power: the nearer to 1 is; a difference of means cannot say which)."""
    from scipy import stats

    by_method = {
        m: {r.subject: r for r in results if r.method == m and not r.error} for m in (first, second)
    }
    common = sorted(set(by_method[first]) & set(by_method[second]))
    tests: dict[str, PairedTest] = {}
    for metric in metrics:
        a = np.array([by_method[first][s].values.get(metric.key, math.nan) for s in common])
        b = np.array([by_method[second][s].values.get(metric.key, math.nan) for s in common])
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        n = int(a.size)
        if n < 2:
            tests[metric.key] = PairedTest(n, _mean(a - b), math.nan, math.nan, None)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            outcome = stats.ttest_rel(a, b)
        diff = float(np.mean(a - b))
        p = float(outcome.pvalue)
        significant = diff != 0 and math.isfinite(p) and p < SIGNIFICANCE_LEVEL
        better = None
        if significant and metric.higher_is_better is not None:  # else no better direction
            first_better = (diff > 0) == metric.higher_is_better
            better = first if first_better else second
        tests[metric.key] = PairedTest(
            n, diff, float(outcome.statistic), p, better, bool(significant)
        )
    return tests


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan
