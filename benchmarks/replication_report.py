"""The replication study's page (issue 21; plan: benchmarks/replication/plan.md).

    python benchmarks/replication_report.py docs/results/replication --regime docs/results/regime \
        --page docs/results/replication.md

For every cell folder under ROOT (one ``rifle bench`` grid each): the standard ``rifle report`` files
(results.md with the bootstrap, sign test and decision section), then the plan's primary comparisons and
their pre-registered decisions, paired per seed from the runs' ``predictions.npz``: the two-level
bootstrap interval (``rifle.experiments.stats.bootstrap_paired``), the paired t interval, the exact sign
test and the same difference on validation. Writes ROOT/replication_runs.csv, ROOT/replication.json and
the block between the page's markers. Nothing is selected on test.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rifle.experiments.aggregate import PAIRED, bootstrap_fields
from rifle.experiments.collect import collect
from rifle.experiments.grid import expand, load_grid
from rifle.experiments.markdown import update_page
from rifle.experiments.report import write_report
from rifle.experiments.stats import BOOTSTRAP_B, bootstrap_paired, paired_difference, per_class, sign_test

BEGIN, END = "<!-- replication study: begin -->", "<!-- replication study: end -->"
BASELINE = "finetune"
GRIDS = Path(__file__).resolve().parent / "replication"
# the plan's cells in its run order; the comparisons of each (method, baseline), the first is primary
CELLS: dict[str, dict[str, Any]] = {
    "elpv64": {
        "id": "R1",
        "what": "ELPV, EfficientNet-Lite0, seeds 5-14 (fresh)",
        "pairs": [("rifle-K1", BASELINE), ("rifle-K1+reinit-init=norm_matched", BASELINE)],
        "rule": "replication",
    },
    "digits64_noise40": {
        "id": "R2a",
        "what": "digits 64 px, label noise 0.4, seeds 0-4",
        "pairs": [
            ("rifle-K1", BASELINE),
            ("rifle-K2", BASELINE),
            ("finetune+ls0.1", BASELINE),
            ("rifle-K1+ls0.1", "finetune+ls0.1"),
        ],
        "rule": "noise",
        "noise": 0.4,
    },
    "digits64_noise20": {
        "id": "R2b",
        "what": "digits 64 px, label noise 0.2, seeds 0-4",
        "pairs": [
            ("rifle-K1", BASELINE),
            ("rifle-K2", BASELINE),
            ("finetune+ls0.1", BASELINE),
            ("rifle-K1+ls0.1", "finetune+ls0.1"),
        ],
        "rule": "noise",
        "noise": 0.2,
    },
    "elpv64_lite2": {
        "id": "R3",
        "what": "ELPV, EfficientNet-Lite2, seeds 0-4",
        "pairs": [("rifle-K1", BASELINE)],
        "rule": "replication",
    },
}
NOISE_ZERO_CELL = "digits64"  # the regime study's cell: noise 0, same recipe and seeds
EFFECT = 1.0  # points: RIFLE's ELPV-sized gain, the plan's "refuted" bound for R2


def _pts(x: float) -> float:
    return 100.0 * x


def planned_runs(cell: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return len(expand(load_grid(GRIDS / f"{cell}.yaml"), tmp))


def by_label_seed(col) -> dict[str, dict[int, Any]]:
    out: dict[str, dict[int, Any]] = defaultdict(dict)
    for r in col.runs:
        out[r.label][r.seed] = r
    return out


def compare(runs: dict[str, dict[int, Any]], method: str, base: str) -> dict[str, Any] | None:
    """``method`` - ``base`` paired per seed, in points: final test (primary), final validation, test at
    best validation; the bootstrap from the per-image predictions where every pair has them."""
    seeds = sorted(set(runs.get(method, {})) & set(runs.get(base, {})))
    if not seeds:
        return None
    out: dict[str, Any] = {"method": method, "baseline": base, "seeds": seeds, "n": len(seeds)}
    mine, theirs = [runs[method][s] for s in seeds], [runs[base][s] for s in seeds]
    for key, quantity in (("test", "final"), ("val", "val_final"), ("test_best_val", "bestval")):
        summary_key = PAIRED[quantity][0]
        a = [_pts(r.summary[summary_key]) for r in mine]
        b = [_pts(r.summary[summary_key]) for r in theirs]
        pd = paired_difference(a, b)
        d = [x - y for x, y in zip(a, b)]
        st = sign_test(d)
        # rifle report's bootstrap: nan (with a note) unless every pair's predictions check out
        boot = bootstrap_fields(quantity, mine, theirs, seeds, 0.95, BOOTSTRAP_B)
        lo, hi = boot[f"diff_{quantity}_boot_low"], boot[f"diff_{quantity}_boot_high"]
        out[key] = {
            "mean_method": float(np.mean(a)),
            "mean_base": float(np.mean(b)),
            "delta": pd.mean,
            "t_ci": [pd.ci_low, pd.ci_high],
            "t_p": pd.p_t,
            "per_seed": d,
            "sign": {"positive": st.positive, "negative": st.negative, "ties": st.ties, "p": st.p},
            "bootstrap": None if math.isnan(lo) else [_pts(lo), _pts(hi)],
        }
    return out


def majority_shift(runs: dict[str, dict[int, Any]], method: str, base: str) -> dict[str, Any] | None:
    """The share of test images predicted as the test labels' majority class, method vs baseline (points),
    with the two-level bootstrap; per-class recall of both (mean over seeds, %)."""
    seeds = sorted(set(runs.get(method, {})) & set(runs.get(base, {})))
    preds = [(runs[method][s].predictions(), runs[base][s].predictions()) for s in seeds]
    if not seeds or any(p is None or q is None for p, q in preds):
        return None
    labels = preds[0][0]["test_labels"]
    classes = int(max(labels.max(), *(p["test_final"].max() for pq in preds for p in pq))) + 1
    major = int(np.bincount(labels, minlength=classes).argmax())
    diffs = [
        (p["test_final"] == major).astype(float) - (q["test_final"] == major).astype(float) for p, q in preds
    ]
    lo, hi = bootstrap_paired(diffs)
    recall = {
        name: np.nanmean(
            [per_class(pq[i]["test_final"], pq[i]["test_labels"], classes)[0] for pq in preds], 0
        )
        for i, name in enumerate((method, base))
    }
    share = {
        name: float(np.mean([np.mean(pq[i]["test_final"] == major) for pq in preds]))
        for i, name in enumerate((method, base))
    }
    names = runs[base][seeds[0]].summary.get("classes") or [str(c) for c in range(classes)]
    return {
        "majority_class": names[major],
        "majority_share_of_labels": float(np.mean(labels == major)),
        "share": {k: _pts(v) for k, v in share.items()},
        "delta": _pts(share[method] - share[base]),
        "bootstrap": [_pts(lo), _pts(hi)],
        "recall": {k: [_pts(x) for x in v] for k, v in recall.items()},
        "classes": list(names),
    }


def diagnosis(runs: dict[str, dict[int, Any]], label: str) -> dict[str, Any] | None:
    """RIFLE's first re-init per seed: train loss / accuracy before, gradient ratio, verdict kind."""
    rows = []
    for s in sorted(runs.get(label, {})):
        d = (runs[label][s].summary.get("rifle_diagnosis") or [None])[0]
        if d:
            rows.append(d)
    if not rows:
        return None
    kinds = Counter(
        "delivered"
        if "delivered" in r["verdict"]
        else "weakened"
        if "weakened" in r["verdict"]
        else "neutral"
        for r in rows
    )
    conv = sum("head had converged" in r["verdict"] for r in rows)

    def span(key: str) -> list[float] | None:
        v = [r[key] for r in rows if r.get(key) is not None]
        return [min(v), max(v)] if v else None

    return {
        "n": len(rows),
        "converged": conv,
        "loss_before": span("train_loss_before"),
        "acc_before": span("train_acc_before"),
        "grad_ratio": span("grad_ratio"),
        "head_signal_ratio": span("head_signal_ratio"),
        "verdicts": dict(kinds),
    }


def replication_decision(c: dict[str, Any]) -> str:
    """R1 / R3: replicated (bootstrap above 0 and validation delta > 0), contradicted (bootstrap below 0),
    otherwise not replicated."""
    boot = c["test"]["bootstrap"]
    if boot is None:
        return "undecided (no per-image predictions)"
    if boot[0] > 0 and c["val"]["delta"] > 0:
        return "replicated"
    if boot[1] < 0:
        return "contradicted"
    return "not replicated (no evidence of a gain)"


def noise_decision(d0: float | None, c20: dict | None, c40: dict | None) -> str:
    """R2: supported / refuted / inconclusive, by the plan (amended before any run)."""
    if c40 is None or c40["test"]["bootstrap"] is None or d0 is None:
        return "undecided (the noise-0.4 cell or the noise-0 reference is missing)"
    lo, hi = c40["test"]["bootstrap"]
    d40 = c40["test"]["delta"]
    d20 = c20["test"]["delta"] if c20 else None
    if lo > 0 and c40["val"]["delta"] > 0 and d20 is not None and d40 > d20 > d0:
        return "supported"
    if hi < EFFECT or d40 <= d0:
        return "refuted"
    if d20 is None:
        return "undecided (the noise-0.2 cell is missing)"
    return "inconclusive"


def noise_zero_delta(regime: Path | None) -> float | None:
    """The regime study's digits64 K1 - fine-tuning, final test, mean over its seeds (points)."""
    if regime is None or not (regime / NOISE_ZERO_CELL).is_dir():
        return None
    c = compare(by_label_seed(collect(regime / NOISE_ZERO_CELL)), "rifle-K1", BASELINE)
    return None if c is None else c["test"]["delta"]


def _f(v: float | None, spec: str = "+.2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{_f(ci[0])}, {_f(ci[1])}]"


def _p(p: float) -> str:
    return "–" if p is None or math.isnan(p) else f"{p:.3g}"


def markdown(results: dict[str, Any], root: Path, page: Path) -> str:
    rel = Path(os.path.relpath(root.resolve(), page.resolve().parent))
    lines = [
        BEGIN,
        "",
        "Written by `python benchmarks/replication_report.py docs/results/replication --regime "
        "docs/results/regime --page docs/results/replication.md` from the run folders (per-run numbers: "
        f"[{rel}/replication_runs.csv]({rel}/replication_runs.csv); every cell's standard `rifle report`: "
        f"`{rel}/<cell>/results.md`). Δ = paired difference in points (method − baseline, same seed), mean; "
        "**boot** = two-level bootstrap 95 % interval (seeds, then test images within a seed; 10,000 "
        "resamples, generator seed 0); t = paired t 95 % interval; sign = exact sign test over seeds "
        "(positive/negative, p). Val = final validation accuracy (noisy labels where the cell adds noise). "
        "Nothing is selected on test.",
        "",
        "| cell | runs | method − baseline | n | Δ final test | boot | t | sign | Δ final val | boot (val) "
        "| Δ test @ best val |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, r in results["cells"].items():
        first = True
        for c in r["comparisons"]:
            runs_done = f"{r['complete']}/{r['planned']}" if first else ""
            t, v, b = c["test"], c["val"], c["test_best_val"]
            lines.append(
                f"| {CELLS[cell]['id']} `{cell}` | {runs_done} "
                f"| {c['method']} − {c['baseline']} | {c['n']} | {_f(t['delta'])} | {_ci(t['bootstrap'])} "
                f"| {_ci(t['t_ci'])} | {t['sign']['positive']}/{t['sign']['negative']}, {_p(t['sign']['p'])} "
                f"| {_f(v['delta'])} | {_ci(v['bootstrap'])} | {_f(b['delta'])} {_ci(b['bootstrap'])} |"
            )
            first = False
        if not r["comparisons"]:
            lines.append(
                f"| {CELLS[cell]['id']} `{cell}` | {r['complete']}/{r['planned']} | – | 0 | | | | | | | |"
            )
    lines += ["", "**Decisions by the plan's rules** (benchmarks/replication/plan.md):", ""]
    for key, text in results["decisions"].items():
        lines.append(f"- {key}: **{text}**")
    shifts = [(cell, r["majority"]) for cell, r in results["cells"].items() if r.get("majority")]
    if shifts:
        lines += ["", "**Majority-class shift** (secondary; RIFLE K1 vs fine-tuning, final test):", ""]
        lines.append(
            "| cell | majority class (share of test labels) | predicted as it: K1 / FT | Δ [boot] "
            "| recall per class, K1 | recall per class, FT | mean recall K1 / FT * |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for cell, m in shifts:
            k1, ft = m["share"]["rifle-K1"], m["share"][BASELINE]
            rec = m["recall"]
            lines.append(
                f"| `{cell}` | {m['majority_class']} ({100 * m['majority_share_of_labels']:.1f} %) "
                f"| {k1:.1f} / {ft:.1f} % | {_f(m['delta'])} {_ci(m['bootstrap'])} "
                f"| {' / '.join(f'{x:.1f}' for x in rec['rifle-K1'])} "
                f"| {' / '.join(f'{x:.1f}' for x in rec[BASELINE])} "
                f"| {np.mean(rec['rifle-K1']):.2f} / {np.mean(rec[BASELINE]):.2f} |"
            )
        lines.append("")
        lines.append(
            "\\* Added after the runs (not in the plan): the mean of the per-class recalls (balanced "
            "accuracy), in %, mean over seeds."
        )
        lines.append(
            "Recall columns in class order: "
            + "; ".join(f"`{cell}`: {', '.join(m['classes'])}" for cell, m in shifts[:1])
            + "."
        )
    diags = [(cell, r["diagnosis"]) for cell, r in results["cells"].items() if r.get("diagnosis")]
    if diags:
        lines += ["", "**RIFLE K1's re-init** (the run's own diagnosis, first re-init):", ""]
        lines.append(
            "| cell | runs | head converged | train loss before | train acc before | gradient ratio "
            "| head-signal ratio | verdicts |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for cell, d in diags:

            def rng(v, spec=".2f"):
                return "–" if v is None else f"{v[0]:{spec}}–{v[1]:{spec}}"

            lines.append(
                f"| `{cell}` | {d['n']} | {d['converged']}/{d['n']} | {rng(d['loss_before'])} "
                f"| {rng(d['acc_before'])} | {rng(d['grad_ratio'])} | {rng(d['head_signal_ratio'])} "
                f"| {', '.join(f'{k} {v}' for k, v in sorted(d['verdicts'].items()))} |"
            )
    lines += ["", END]
    return "\n".join(lines)


RUN_COLUMNS = [
    "cell",
    "method",
    "seed",
    "final_test",
    "final_val",
    "test_at_best_val",
    "best_val_epoch",
    "label_noise_flipped",
    "verdict",
    "wall_seconds",
]


def run_rows(cell: str, runs: dict[str, dict[int, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, seeds in sorted(runs.items()):
        for s, r in sorted(seeds.items()):
            sm = r.summary
            diag = (sm.get("rifle_diagnosis") or [{}])[0]
            rows.append(
                {
                    "cell": cell,
                    "method": label,
                    "seed": s,
                    "final_test": round(_pts(sm["final_test_acc"]), 4),
                    "final_val": None
                    if sm.get("final_val_acc") is None
                    else round(_pts(sm["final_val_acc"]), 4),
                    "test_at_best_val": None
                    if sm.get("test_acc_at_best_val") is None
                    else round(_pts(sm["test_acc_at_best_val"]), 4),
                    "best_val_epoch": sm.get("best_val_epoch"),
                    "label_noise_flipped": (sm.get("label_noise") or {}).get("flipped"),
                    "verdict": diag.get("verdict", ""),
                    "wall_seconds": round(sm.get("wall_seconds", 0.0), 1),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="folder holding one rifle bench output folder per cell")
    ap.add_argument("--regime", type=Path, help="the regime study's folder (noise 0 reference, pooled seeds)")
    ap.add_argument("--page", type=Path, help="Markdown page to write between its replication markers")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"cells": {}, "decisions": {}}
    rows: list[dict[str, Any]] = []
    for cell, spec in CELLS.items():
        folder = args.root / cell
        entry: dict[str, Any] = {"planned": planned_runs(cell), "complete": 0, "comparisons": []}
        results["cells"][cell] = entry
        if not (folder / "grid.yaml").is_file():
            continue
        write_report(folder)
        col = collect(folder)
        runs = by_label_seed(col)
        entry["complete"] = len(col.runs)
        entry["comparisons"] = [c for m, b in spec["pairs"] if (c := compare(runs, m, b))]
        entry["majority"] = majority_shift(runs, "rifle-K1", BASELINE) if cell.startswith("elpv") else None
        entry["diagnosis"] = diagnosis(runs, "rifle-K1")
        rows += run_rows(cell, runs)
    cells = results["cells"]

    def primary(cell: str) -> dict[str, Any] | None:
        comps = cells[cell]["comparisons"]
        return comps[0] if comps and comps[0]["method"] == "rifle-K1" else None

    def complete(cell: str) -> bool:
        return cells[cell]["complete"] == cells[cell]["planned"]

    for cell in ("elpv64", "elpv64_lite2"):
        c = primary(cell)
        state = (
            ""
            if complete(cell)
            else f" — cell incomplete ({cells[cell]['complete']}/{cells[cell]['planned']} runs)"
        )
        results["decisions"][f"{CELLS[cell]['id']} ({CELLS[cell]['what']})"] = (
            "no runs yet" if c is None else replication_decision(c) + state
        )
    d0 = noise_zero_delta(args.regime)
    c20, c40 = primary("digits64_noise20"), primary("digits64_noise40")
    incomplete = [c for c in ("digits64_noise40", "digits64_noise20") if not complete(c)]
    results["noise_zero_delta"] = d0
    results["decisions"]["R2 (RIFLE K1's gain grows with the label-noise rate)"] = (
        noise_decision(d0, c20, c40)
        + f" — Δ_0 = {_f(d0)} (regime study), Δ_0.2 = {_f(c20['test']['delta'] if c20 else None)}, "
        f"Δ_0.4 = {_f(c40['test']['delta'] if c40 else None)}"
        + (f"; incomplete: {', '.join(incomplete)}" if incomplete else "")
    )
    if args.regime and (args.regime / "elpv64").is_dir() and primary("elpv64"):
        pooled = by_label_seed(collect(args.regime / "elpv64"))
        fresh = by_label_seed(collect(args.root / "elpv64"))
        for label in (BASELINE, "rifle-K1"):
            pooled[label].update(fresh.get(label, {}))
        c = compare(pooled, "rifle-K1", BASELINE)
        if c:
            results["pooled_elpv"] = c
            results["decisions"][
                "R1 secondary: ELPV seeds 0–14 pooled (paired t only; the regime runs have no predictions)"
            ] = (
                f"Δ final test {_f(c['test']['delta'])} {_ci(c['test']['t_ci'])} (n = {c['n']}), "
                f"Δ final val {_f(c['val']['delta'])} {_ci(c['val']['t_ci'])}"
            )
    buf = io.StringIO()
    w = csv.DictWriter(buf, RUN_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "replication_runs.csv").write_text(buf.getvalue())
    (args.root / "replication.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    if args.page:
        update_page(args.page, markdown(results, args.root, args.page), BEGIN, END)
    for key, text in results["decisions"].items():
        print(f"{key}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
