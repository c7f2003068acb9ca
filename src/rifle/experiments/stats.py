"""Statistics over seeds for paired experiments: mean ± sample std, Student-t intervals, and the paired
difference of two methods over the same seeds with the paired t-test (Student, "The probable error of a
mean", Biometrika 1908) and the Wilcoxon signed-rank test (Wilcoxon, "Individual comparisons by ranking
methods", Biometrics Bulletin 1945), both from scipy.stats. Degenerate cases (n < 2, zero spread) are
decided here; the rules: docs/experiments.md, "Statistics".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

WILCOXON_MIN_N = 6
NAN = float("nan")


def _values(xs: Sequence[float]) -> list[float]:
    out = [float(x) for x in xs]
    if any(not math.isfinite(x) for x in out):
        raise ValueError(f"non-finite value in {out}")
    return out


def mean_std(xs: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample std with ddof=1, n)``; ``(nan, nan, 0)`` when empty, std ``nan`` when n = 1."""
    v = _values(xs)
    n = len(v)
    if n == 0:
        return NAN, NAN, 0
    m = sum(v) / n
    if n < 2:
        return m, NAN, n
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)), n


def t_interval(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean: ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m, sd, n = mean_std(xs)
    if n < 2:
        return NAN, NAN
    if sd == 0:
        return m, m
    from scipy import stats

    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return m - half, m + half


@dataclass(frozen=True)
class PairedDiff:
    """``a - b`` over paired samples (seeds)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p_t: float  # paired t-test, two-sided
    p_wilcoxon: float  # Wilcoxon signed-rank, two-sided; nan when n < WILCOXON_MIN_N
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Paired comparison of ``a`` against ``b`` (same length, same order of seeds)."""
    a, b = _values(a), _values(b)
    if len(a) != len(b):
        raise ValueError(f"paired samples need the same length, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, sd, n = mean_std(d)
    lo, hi = t_interval(d, confidence) if n >= 2 else (NAN, NAN)
    if n < 2:
        p_t = NAN
    elif sd == 0:
        p_t = 1.0 if m == 0 else 0.0
    else:
        from scipy import stats

        p_t = float(stats.ttest_rel(a, b).pvalue)
    p_w = NAN
    if n >= WILCOXON_MIN_N:
        if all(x == 0 for x in d):
            p_w = 1.0
        else:
            from scipy import stats

            p_w = float(stats.wilcoxon(a, b).pvalue)
    return PairedDiff(
        n=n, mean=m, std=sd, ci_low=lo, ci_high=hi, p_t=p_t, p_wilcoxon=p_w, confidence=confidence
    )


def pair_by_key(a: dict, b: dict) -> tuple[list, list[float], list[float]]:
    """Align two ``{seed: value}`` maps on their common keys (sorted): ``(keys, a_values, b_values)``."""
    keys = sorted(set(a) & set(b))
    return keys, [a[k] for k in keys], [b[k] for k in keys]
