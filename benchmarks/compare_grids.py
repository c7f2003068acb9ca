"""Do two runs of one grid report the same numbers? Per run and per method, paired by run folder.

    python benchmarks/compare_grids.py docs/results/elpv runs/elpv_grid

For each run present in both (same dataset/model/fraction/method/seed folder), the difference B - A of
``final_test_acc`` and ``test_acc_at_best_val``; per method, the mean difference over seeds beside the
seed-to-seed standard deviation of A over all its seeds (the run-to-run noise a reported mean carries),
and whether the method's mean moved by more than that. Bit-identical grids print 0 everywhere.

Then, for grids run with different numerics (another thread count or CPU): is there a shift? Over all
runs, the mean per-run difference with a paired t-test (``scipy.stats.ttest_1samp``); per method, its mean
difference against twice its standard error, taken from the sd of all per-run differences / sqrt(n):
with no shift, about 1 method in 20 exceeds it by chance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

KEYS = ("final_test_acc", "test_acc_at_best_val")


def runs(root: Path) -> dict[tuple[str, ...], dict]:
    out = {}
    for p in root.rglob("summary.json"):
        s = json.loads(p.read_text())
        if s.get("complete", True):
            out[p.parent.relative_to(root).parts] = s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="a grid's --out (or a published copy such as docs/results/elpv)")
    ap.add_argument("b", type=Path, help="the other grid's --out")
    a = ap.parse_args(argv)
    ra, rb = runs(a.a), runs(a.b)
    both = sorted(set(ra) & set(rb))
    if not both:
        sys.exit(f"no run folder is in both {a.a} and {a.b}")
    print(f"{len(both)} runs in both ({len(ra)} in {a.a}, {len(rb)} in {a.b})\n")
    identical = sum(all(ra[k][m] == rb[k][m] for m in KEYS) for k in both)
    print(f"bit-identical final and best-val test accuracies: {identical} of {len(both)}\n")
    groups: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
    for k in both:
        groups[k[:-1]].append(k)
    print("| runs (seed folders) | n | metric | mean A | mean B | B - A | seed sd of A | |B - A| > sd |")
    print("|---|---|---|---|---|---|---|---|")
    moved, cells, diffs = 0, 0, {m: [] for m in KEYS}
    shift: dict[tuple[tuple[str, ...], str], tuple[float, int]] = {}  # (group, metric): (B - A, n)
    for g, ks in sorted(groups.items()):
        for m in KEYS:
            xa, xb = [ra[k][m] for k in ks], [rb[k][m] for k in ks]
            diffs[m] += [y - x for x, y in zip(xa, xb)]
            all_a = [s[m] for k, s in ra.items() if k[:-1] == g]  # every seed of A, not only the shared
            sd = statistics.stdev(all_a) if len(all_a) > 1 else float("nan")
            d = statistics.mean(xb) - statistics.mean(xa)
            shift[g, m] = d, len(ks)
            big = abs(d) > sd
            moved, cells = moved + big, cells + 1
            print(
                f"| {'/'.join(g)} | {len(ks)} | {m} | {statistics.mean(xa):.4f} | {statistics.mean(xb):.4f} "
                f"| {d:+.4f} | {sd:.4f} | {'yes' if big else ''} |"
            )
    print()
    for m in KEYS:
        d = diffs[m]
        print(
            f"{m}: per-run B - A mean {statistics.mean(d):+.4f}, "
            f"sd {statistics.stdev(d) if len(d) > 1 else float('nan'):.4f}, "
            f"range [{min(d):+.4f}, {max(d):+.4f}] over {len(d)} runs"
        )
    print(f"method means that moved by more than their seed sd: {moved} of {cells}")
    if any(len(d) > 2 and statistics.stdev(d) > 0 for d in diffs.values()):
        from scipy import stats

        print("\nshift test (B - A; no shift expected when only the numerics differ):")
        for m in KEYS:
            d = diffs[m]
            t = stats.ttest_1samp(d, 0.0)
            sd = statistics.stdev(d)
            over = [
                "/".join(g[-2:])
                for g in sorted(groups)
                if abs(shift[g, m][0]) > 2 * sd / shift[g, m][1] ** 0.5
            ]
            print(
                f"  {m}: mean {statistics.mean(d):+.4f} over {len(d)} runs, paired t p={t.pvalue:.3g}; "
                f"method means beyond 2 SE ({2 * sd:.4f} / sqrt(n)): {len(over)} of {len(groups)}"
                + (f" ({', '.join(over)})" if over else "")
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
