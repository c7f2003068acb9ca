"""The numbers docs/results/regime.md and docs/rifle.md#when quote beyond the generated tables (issue 21).

    python benchmarks/regime_checks.py docs/results/regime [--head-signal docs/results/regime_head_signal]

Reads only the committed run files (each run's ``summary.json``, ``regime_runs.csv``, and the addendum's
``head_signal_runs.csv``) and prints: the K=1 / K=2 validation ties, every paired difference's p (paired t)
with Holm's correction over the ones not identically zero, the validation differences, the smallest
difference 5 seeds detect, and the counts behind the verdict's wording. The p-values and the correction
were added after the runs (the plan asked for means and t intervals).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

BASE = "finetune"
METHODS = [
    "rifle-K1",
    "rifle-K2",
    "rifle-K1+reinit-init=norm_matched",
    "rifle-K1+reinit-trigger=converged",
    "lp-ft",
]
CELLS = ["digits64", "digits32", "elpv64"]


def summaries(root: Path) -> dict[tuple[str, str], dict[int, dict]]:
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for f in sorted(root.glob("*/*/*/*/*/seed*/summary.json")):
        cell, method, seed = f.parts[-7], f.parts[-3], int(f.parts[-2][4:])
        out.setdefault((cell, method), {})[seed] = json.loads(f.read_text())
    return out


def mde_factor(n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """(t_{1-alpha/2, n-1} + t_{power, n-1}) / sqrt(n): the paired-t difference detectable, per SD."""
    return (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) / math.sqrt(n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--head-signal", type=Path, default=Path("docs/results/regime_head_signal"))
    args = ap.parse_args(argv)
    runs = summaries(args.root)
    print("K selection (correct validation images at the best-validation epoch, summed over seeds):")
    for c in CELLS:
        n_val = runs[(c, "rifle-K1")][0]["data_info"]["sizes"]["val"]
        acc = {m: [runs[(c, m)][s]["best_val_acc"] for s in range(5)] for m in ("rifle-K1", "rifle-K2")}
        print(
            f"  {c}: "
            + ", ".join(f"{m} {round(sum(a) * n_val)} ({100 * np.mean(a):.2f})" for m, a in acc.items())
        )
    tests = []
    print("paired differences vs fine-tuning, points: mean, SD, p (paired t)")
    for c in CELLS:
        base = runs[(c, BASE)]
        for m in METHODS:
            for key in ("final_test_acc", "test_acc_at_best_val", "final_val_acc", "best_val_acc"):
                d = np.array([100 * (runs[(c, m)][s][key] - base[s][key]) for s in range(5)])
                sd = d.std(ddof=1)
                p = stats.ttest_1samp(d, 0).pvalue if sd > 0 else None
                if key.startswith(("final_test", "test_")):
                    tests.append((p, f"{c} {m} {key}"))
                print(f"  {c} {m} {key}: {d.mean():+.2f}, SD {sd:.2f}, p {'-' if p is None else f'{p:.4f}'}")
    live = sorted((p, name) for p, name in tests if p is not None)
    print(f"Holm over the {len(live)} test differences not identically zero (of {len(tests)} on the page):")
    adj = 0.0
    for i, (p, name) in enumerate(live):
        adj = max(adj, min(1.0, (len(live) - i) * p))
        print(f"  {name}: p {p:.4f} -> {adj:.3f}")
    f = mde_factor(5)
    print(
        f"smallest difference detected (5 seeds, alpha 0.05 two-sided, power 0.8): {f:.3f} x SD of final test"
    )
    rows = list(csv.DictReader((args.root / "regime_runs.csv").open()))

    def val(r: dict, k: str) -> float:
        return float(r[k])

    for c in CELLS:
        for m in ("rifle-K1", "rifle-K1+reinit-init=norm_matched"):
            d = [val(r, "delta_final") for r in rows if r["cell"] == c and r["method"] == m]
            print(f"  {c} {m}: SD {np.std(d, ddof=1):.2f} -> {f * np.std(d, ddof=1):.2f} points")
    print("ratio ranges (÷ control for RIFLE-K1, the control's own after/before ratio):")
    for c in CELLS:
        k1 = [val(r, "ratio_vs_control") for r in rows if r["cell"] == c and r["method"] == "rifle-K1"]
        ft = [val(r, "grad_ratio") for r in rows if r["cell"] == c and r["method"] == BASE]
        print(f"  {c}: ÷ control {min(k1):.3f}-{max(k1):.3f}; fine-tuning {min(ft):.3f}-{max(ft):.3f}")
    for m in ("rifle-K1", "rifle-K1+reinit-init=norm_matched"):
        for conv in ("True", "False"):
            rs = [r for r in rows if r["method"] == m and r["converged"] == conv]
            up = sum(val(r, "ratio_vs_control") > 1 for r in rs)
            print(f"  {m}, converged={conv}: ÷ control > 1 in {up} of {len(rs)}")
    ft = [r for r in rows if r["method"] == BASE]
    up = sum(val(r, "grad_ratio") >= 1 for r in ft)
    print(f"  fine-tuning's after/before >= 1 at {up} of {len(ft)} boundaries")
    hs = list(csv.DictReader((args.head_signal / "head_signal_runs.csv").open()))
    ref = [val(r, "ratio_vs_control") > 1 for r in hs]
    by_hs = [val(r, "head_signal_ratio") >= 1 for r in hs]
    by_g = [val(r, "grad_ratio") >= 1 for r in hs]
    agree_hs, agree_g = sum(a == b for a, b in zip(by_hs, ref)), sum(a == b for a, b in zip(by_g, ref))
    print(
        f"agreement with ÷ control > 1 (addendum, {len(hs)} RIFLE-K1 runs): head signal >= 1 {agree_hs}, "
        f"after/before >= 1 {agree_g}"
    )
    unconv = [r for r, h in zip(hs, by_hs) if h and r["converged"] == "False"]
    print(
        f"  not converged with head signal >= 1: {len(unconv)}, of which ÷ control <= 1: "
        f"{sum(val(r, 'ratio_vs_control') <= 1 for r in unconv)}"
    )


if __name__ == "__main__":
    main()
