"""Whether two methods differ beyond seed noise: seed-paired differences with a t-interval.

Runs are paired by their seeds (``aggregate.order_key``: the training seed and the class-order
seed), so both methods of a pair saw the same class order and the same data; the difference of
a metric is taken within each pair, and its mean over the pairs gets a Student-t confidence
interval and a two-sided paired t-test (``scipy.stats.t``; the same p as ``ttest_rel``). Assumptions, stated in every caption
that uses them: the per-pair differences are independent draws from one roughly normal
distribution (with 3-5 seeds the test has little power: "tied" means "not shown to differ",
not "equal"); no correction for testing several methods against the best.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE

TEST_CAPTION = "a seed-paired two-sided t-test at 5%"
TEST_ASSUMPTIONS = ("pairs share the training seed and class order; the test assumes the per-seed differences "
                    "are independent and roughly normal; no correction for multiple comparisons")


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the seed pairs both have: mean, ``CONFIDENCE`` interval, two-sided p-value,
    and the number of pairs. With fewer than two pairs the interval and p are NaN; with
    differences that do not vary the interval is the point itself and p is 0 (or 1 when all are 0)."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int

    @property
    def significant(self) -> bool:
        """The difference is shown (p < ``ALPHA``); False where it cannot be tested."""
        return not math.isnan(self.p_value) and self.p_value < ALPHA


def paired_difference(a: Mapping[str, float], b: Mapping[str, float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """The seed-paired difference ``a - b`` (``a``, ``b``: metric by seed pair)."""
    common = sorted(k for k in set(a) & set(b)
                    if a[k] is not None and b[k] is not None and not (math.isnan(a[k]) or math.isnan(b[k])))
    d = np.asarray([a[k] - b[k] for k in common], dtype=float)
    nan = float("nan")
    if len(d) == 0:
        return PairedDifference(nan, nan, nan, nan, 0)
    mean = float(d.mean())
    if len(d) < 2:
        return PairedDifference(mean, nan, nan, nan, 1)
    sd = float(d.std(ddof=1))
    if sd <= 1e-9 * max(1.0, abs(mean)):  # a constant difference (up to rounding) is exactly known
        return PairedDifference(mean, mean, mean, 1.0 if abs(mean) <= 1e-9 else 0.0, len(d))
    se = sd / math.sqrt(len(d))
    half = float(stats.t.ppf((1 + confidence) / 2, len(d) - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, len(d) - 1))  # = scipy.stats.ttest_rel(a, b).pvalue
    return PairedDifference(mean, mean - half, mean + half, p, len(d))


def tied_with_best(by_seed: Sequence[Mapping[str, float] | None], higher_is_better: bool) -> list[bool] | None:
    """Which entries are the best mean or not shown to differ from it (paired test above); None
    when no entry has two seed pairs in common with the best (nothing can be tested: the caller
    marks the best mean alone). An entry that cannot be paired with the best is not marked."""
    means = [float(np.nanmean(list(v.values()))) if v else float("nan") for v in by_seed]
    present = [i for i, m in enumerate(means) if not math.isnan(m)]
    if len(present) < 2:
        return None
    best = max(present, key=lambda i: means[i]) if higher_is_better else min(present, key=lambda i: means[i])
    diffs = {i: paired_difference(by_seed[best], by_seed[i]) for i in present if i != best}
    if all(d.n < 2 for d in diffs.values()):
        return None
    return [i == best or (i in diffs and diffs[i].n >= 2 and not diffs[i].significant) for i in range(len(by_seed))]


def interval_text(d: PairedDifference, digits: int = 2) -> str:
    """``+1.23 [-0.40, +2.86]``, the mean alone where there is no interval, ``–`` for no pairs."""
    if d.n == 0:
        return "–"
    if math.isnan(d.low):
        return f"{d.mean:+.{digits}f}"
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"
