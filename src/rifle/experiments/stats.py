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


@dataclass(frozen=True)
class SignTest:
    """Exact two-sided sign test over seeds (``scipy.stats.binomtest``, p = 1/2, ties dropped)."""

    positive: int
    negative: int
    ties: int
    p: float  # nan when every pair is a tie (or there is none)


def sign_test(d: Sequence[float]) -> SignTest:
    """Sign test of the paired differences ``d`` (e.g. 5 of 5 positive: p = 2 / 2^5 = 0.0625)."""
    v = _values(d)
    pos, neg = sum(x > 0 for x in v), sum(x < 0 for x in v)
    p = NAN
    if pos + neg:
        from scipy import stats

        p = float(stats.binomtest(pos, pos + neg, 0.5, alternative="two-sided").pvalue)
    return SignTest(pos, neg, len(v) - pos - neg, p)


BOOTSTRAP_B = 10_000
BOOTSTRAP_SEED = 0


def bootstrap_paired(
    diffs: Sequence[Sequence[float]],
    b: int = BOOTSTRAP_B,
    confidence: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
    chunk: int = 1 << 22,
) -> tuple[float, float]:
    """Two-level bootstrap interval of the mean over seeds of per-seed mean differences.

    ``diffs[s]`` holds seed ``s``'s per-image differences (``correct_a - correct_b`` in {-1, 0, 1}, the
    same images for both methods). With ``rng = np.random.default_rng(seed)``, ``S = len(diffs)``,
    ``n_s = len(diffs[s])`` and ``N = max n_s``, the draws, all from ``rng.random`` (float64, C order):

    1. ``U = rng.random((b, S))``; resample ``r`` draws seeds ``k_rj = min(floor(U[r, j] * S), S - 1)``,
       ``j = 0..S-1`` (with replacement);
    2. then, for ``r = 0..b-1`` and ``j = 0..S-1`` in that order, ``N`` values ``V = rng.random(N)``;
       the first ``n = n_{k_rj}`` give the images ``i_t = min(floor(V[t] * n), n - 1)``, ``t < n`` (the
       rest are drawn and unused); ``m_rj = sum_t diffs[k_rj][i_t] / n``;
    3. ``M_r = (m_r0 + m_r1 + ... + m_r(S-1)) / S``, added in that order.

    Returns ``np.percentile(M, [100 (1 - c) / 2, 100 (1 + c) / 2])`` (numpy's default, linear);
    ``(nan, nan)`` without seeds. Step 2 runs vectorised in blocks of about ``chunk`` values, which draws
    the same numbers as one call (``random`` takes one 64-bit output per value).
    """
    import numpy as np

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    s_count = len(diffs)
    if s_count == 0 or b < 1:
        return NAN, NAN
    n = np.array([len(x) for x in diffs], dtype=np.int64)
    if (n == 0).any():
        raise ValueError("bootstrap_paired: a seed without images")
    big = int(n.max())
    table = np.zeros((s_count, big))
    for s, x in enumerate(diffs):
        table[s, : n[s]] = np.asarray(x, dtype=float)
    if not np.isfinite(table).all():
        raise ValueError("bootstrap_paired: non-finite difference")
    flat = table.ravel()
    rng = np.random.default_rng(seed)
    picks = np.minimum((rng.random((b, s_count)) * s_count).astype(np.int64), s_count - 1)
    ragged = bool((n != big).any())
    means = np.empty(b)
    rows = max(1, chunk // (s_count * big))
    for start in range(0, b, rows):
        k = picks[start : start + rows]  # (m, S)
        ns = n[k][..., None]  # (m, S, 1)
        u = rng.random((len(k), s_count, big))
        u *= ns if ragged else big
        idx = u.astype(np.int64)
        np.minimum(idx, ns - 1, out=idx)
        idx += k[..., None] * big  # into the flat table
        vals = np.take(flat, idx)
        if ragged:
            vals[np.arange(big) >= ns] = 0.0
        per_seed = vals.sum(axis=-1) / ns[..., 0]
        acc = np.zeros(len(k))
        for j in range(s_count):
            acc += per_seed[:, j]
        means[start : start + rows] = acc / s_count
    lo, hi = np.percentile(means, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(lo), float(hi)


def paired_t_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test (n pairs, level ``alpha``) when the true mean difference is
    ``delta`` and the differences' SD is ``sd``: ``P(|T| > t_{1-alpha/2, n-1})`` with ``T`` noncentral t,
    ``n - 1`` degrees of freedom, noncentrality ``delta sqrt(n) / sd``."""
    from scipy import integrate, stats

    df, nc = n - 1, delta * math.sqrt(n) / sd
    tc = float(stats.t.ppf(1 - alpha / 2, df))
    p = float(stats.nct.sf(tc, df, nc) + stats.nct.cdf(-tc, df, nc))
    if not math.isfinite(p):  # scipy's nct gives nan far in its tails: integrate over T's chi2 part
        p = integrate.quad(
            lambda v: (
                (stats.norm.sf(tc * math.sqrt(v / df) - nc) + stats.norm.cdf(-tc * math.sqrt(v / df) - nc))
                * stats.chi2.pdf(v, df)
            ),
            0,
            math.inf,
            limit=200,
        )[0]
    return min(1.0, max(0.0, p))


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference the paired t-test over ``n`` seeds detects with probability
    ``power`` at two-sided level ``alpha``, for differences with SD ``sd``: the ``delta`` solving
    :func:`paired_t_power` ``(delta, sd, n, alpha) = power`` (exact noncentral t; the normal shortcut is
    ``(t_{1-alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)``). nan for n < 2; 0 when ``sd`` is 0."""
    if n < 2 or not math.isfinite(sd):
        return NAN
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq

    hi = sd
    while paired_t_power(hi, sd, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: paired_t_power(d, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * sd))


def seeds_needed(delta: float, sd: float, alpha: float = 0.05, power: float = 0.8, cap: int = 100_000) -> int:
    """The fewest seeds (>= 2) at which the paired t-test detects ``delta`` with ``power`` given the SD
    ``sd`` of the paired differences (:func:`paired_t_power`); ``cap`` when even that many do not."""
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while paired_t_power(delta, sd, hi, alpha) < power:
        if hi >= cap:
            return cap
        lo, hi = hi + 1, min(cap, hi * 2)
    while lo < hi:  # power grows with n
        mid = (lo + hi) // 2
        if paired_t_power(delta, sd, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def per_class(preds: Sequence, labels: Sequence, classes: int) -> tuple[list[float], list[float]]:
    """``(recall, predicted share)`` per class of one run: recall = correct / images of the class (nan
    when the split has none), predicted share = images predicted as the class / all images."""
    import numpy as np

    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    recall, share = [], []
    for c in range(classes):
        of_c = y == c
        recall.append(float((p[of_c] == c).mean()) if of_c.any() else NAN)
        share.append(float((p == c).mean()) if len(p) else NAN)
    return recall, share
