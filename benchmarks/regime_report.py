"""The regime study's page (issue 12; plan: benchmarks/regime/plan.md).

    python benchmarks/regime_report.py docs/results/regime --page docs/results/regime.md

For every cell folder under ROOT (one ``rifle bench`` grid each): the standard ``rifle report`` files
(results.md / results.csv / plots, K of RIFLE selected on validation), then, across cells, one row per
run pairing RIFLE's diagnosis (train loss / accuracy in the epoch before the first re-init, backbone
gradient ratio after/before) with its paired difference in test accuracy vs fine-tuning of the same seed,
and fine-tuning's own gradient ratio at the same epoch boundary (``depth.jsonl``, the control).
Writes ROOT/regime_runs.csv, ROOT/regime_summary.csv, two PNGs, and the block between the page's
markers. Nothing is selected on test.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from rifle.analysis.depth import read_monitor, summarize_monitor
from rifle.experiments.collect import collect
from rifle.experiments.markdown import update_page
from rifle.experiments.report import write_report
from rifle.experiments.stats import mean_std, paired_difference

BASELINE = "finetune"
BEGIN, END = "<!-- regime study: begin -->", "<!-- regime study: end -->"
RUN_COLUMNS = [
    "cell",
    "method",
    "seed",
    "reinit_epoch",
    "train_loss_before",
    "train_acc_before",
    "grad_ratio",
    "grad_ratio_first",
    "grad_ratio_middle",
    "grad_ratio_last",
    "control_ratio",
    "ratio_vs_control",
    "head_signal_ratio",
    "converged",
    "verdict",
    "fired",
    "final_test",
    "bestval_test",
    "delta_final",
    "delta_bestval",
]


def _verdict_kind(text: str | None) -> str:
    if not text:
        return ""
    if "delivered" in text:
        return "delivered"
    if "weakened" in text:
        return "weakened"
    return "neutral"


def _loss_before(run, epoch: int) -> tuple[float | None, float | None]:
    """Fine-tuning's train loss / accuracy in the epoch before ``epoch`` (metrics.jsonl)."""
    for row in run.metrics():
        if row.get("epoch") == epoch - 1:
            return row.get("train_loss"), row.get("train_acc")
    return None, None


def run_rows(cell: str, col) -> list[dict[str, Any]]:
    by_label: dict[str, dict[int, Any]] = defaultdict(dict)
    for r in col.runs:
        by_label[r.label][r.seed] = r
    base = by_label.get(BASELINE, {})
    rows = []
    for label, seeds in by_label.items():
        for seed, r in sorted(seeds.items()):
            s = r.summary
            row: dict[str, Any] = {
                "cell": cell,
                "method": label,
                "seed": seed,
                "final_test": s["final_test_acc"],
                "bestval_test": s["test_acc_at_best_val"],
            }
            b = base.get(seed)
            if b is not None and label != BASELINE:
                row["delta_final"] = 100 * (s["final_test_acc"] - b.summary["final_test_acc"])
                row["delta_bestval"] = 100 * (s["test_acc_at_best_val"] - b.summary["test_acc_at_best_val"])
            diag = s.get("rifle_diagnosis") or []
            trig = s.get("rifle_trigger")
            if trig is not None:
                row["fired"] = len(trig.get("fired") or [])
            if diag:
                d = diag[0]
                thirds = d.get("grad_ratio_thirds") or [None] * 3
                row.update(
                    reinit_epoch=d["at"],
                    train_loss_before=d.get("train_loss_before"),
                    train_acc_before=d.get("train_acc_before"),
                    grad_ratio=d.get("grad_ratio"),
                    grad_ratio_first=thirds[0],
                    grad_ratio_middle=thirds[1],
                    grad_ratio_last=thirds[2],
                    head_signal_ratio=d.get("head_signal_ratio"),
                    converged="had converged" in (d.get("verdict") or ""),
                    verdict=_verdict_kind(d.get("verdict")),
                )
            elif label == BASELINE:
                summ = summarize_monitor(read_monitor(r.path))
                if summ and summ.get("grad_ratio") and summ.get("watch_epochs"):
                    epoch = summ["watch_epochs"][0]
                    loss, acc = _loss_before(r, epoch)
                    g = summ["grad_ratio"]
                    row.update(
                        reinit_epoch=epoch,
                        train_loss_before=loss,
                        train_acc_before=acc,
                        grad_ratio=sum(g) / len(g),
                        grad_ratio_first=g[0],
                        grad_ratio_middle=g[1],
                        grad_ratio_last=g[2],
                        verdict="control",
                    )
            rows.append(row)
    control = {r["seed"]: r for r in rows if r["method"] == BASELINE and r.get("grad_ratio") is not None}
    for r in rows:  # fine-tuning's ratio at the same boundary (K=1's epoch; same seed)
        c = control.get(r["seed"])
        if (
            r["method"] != BASELINE
            and r.get("grad_ratio") is not None
            and c is not None
            and c["reinit_epoch"] == r["reinit_epoch"]
        ):
            r["control_ratio"] = c["grad_ratio"]
            r["ratio_vs_control"] = r["grad_ratio"] / c["grad_ratio"]
    return rows


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def summary_rows(rows: list[dict[str, Any]], selected: dict[str, str]) -> list[dict[str, Any]]:
    """One row per cell x method: means over seeds, paired Δ with a 95% t interval."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["cell"], r["method"])].append(r)
    out = []
    for (cell, method), rs in groups.items():
        base = {r["seed"]: r for r in rows if r["cell"] == cell and r["method"] == BASELINE}
        row: dict[str, Any] = {
            "cell": cell,
            "method": method,
            "n": len(rs),
            "selected_on_val": selected.get(cell) == method,
        }
        for key in (
            "train_loss_before",
            "train_acc_before",
            "grad_ratio",
            "ratio_vs_control",
            "final_test",
            "bestval_test",
        ):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = mean_std(vals)[0] if vals else None
        conv = [r["converged"] for r in rs if "converged" in r]
        row["converged"] = f"{sum(conv)}/{len(conv)}" if conv else None
        row["verdicts"] = ", ".join(
            f"{k} {v}" for k, v in sorted(Counter(r.get("verdict") for r in rs if r.get("verdict")).items())
        )
        if any("fired" in r for r in rs):
            row["fired"] = sum(1 for r in rs if r.get("fired"))
        if method != BASELINE:
            for name, key in (("final", "final_test"), ("bestval", "bestval_test")):
                seeds = sorted(r["seed"] for r in rs if r["seed"] in base)
                if len(seeds) >= 2:
                    a = [next(r[key] for r in rs if r["seed"] == s) for s in seeds]
                    b = [base[s][key] for s in seeds]
                    d = paired_difference(a, b)
                    row.update(
                        {
                            f"d_{name}": 100 * d.mean,
                            f"d_{name}_lo": 100 * d.ci_low,
                            f"d_{name}_hi": 100 * d.ci_high,
                            f"p_{name}": d.p_t,
                        }
                    )
        out.append(row)
    return out


def markdown(
    summary: list[dict[str, Any]], cells: list[str], order: list[str], root: Path, page: Path
) -> str:
    rel = Path(os.path.relpath(root.resolve(), page.resolve().parent)).as_posix()
    lines = [
        BEGIN,
        "",
        f"Written by `python benchmarks/regime_report.py {root} --page {page}` from the run "
        f"folders; per-run numbers in [{rel}/regime_runs.csv]({rel}/regime_runs.csv), each cell's "
        f"standard report in `{rel}/<cell>/results.md`. Loss / acc / ratio: the first re-init's "
        "diagnosis (RIFLE rows) or fine-tuning's own numbers at the same epoch boundary (control); "
        "ratio = backbone gradient norm in the 5 steps after / before, mean of the three thirds; "
        "÷ control = that ratio over fine-tuning's at the same boundary, same seed (K=1's epoch "
        "only). "
        "Δ = paired difference vs fine-tuning in points, mean [95% t interval]; ✓ = K selected on "
        "validation (highest mean best-validation accuracy; ties: the smaller K).",
        "",
    ]
    for cell in cells:
        rs = {r["method"]: r for r in summary if r["cell"] == cell}
        if not rs:
            continue
        lines += [
            f"#### {cell}",
            "",
            "| method | n | train loss / acc before | converged | gradient ratio | ÷ control | verdicts | "
            "final test | Δ final | Δ at best val |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in [m for m in order if m in rs] + sorted(set(rs) - set(order)):
            r = rs[m]
            name = m + (" ✓" if r["selected_on_val"] else "")
            if "fired" in r:
                name += f" (fired in {r['fired']}/{r['n']})"
            lb = (
                f"{_fmt(r['train_loss_before'])} / {_fmt(r['train_acc_before'])}"
                if r.get("train_loss_before") is not None
                else "–"
            )
            df = (
                f"{r['d_final']:+.2f} [{r['d_final_lo']:+.2f}, {r['d_final_hi']:+.2f}]"
                if r.get("d_final") is not None
                else "–"
            )
            db = (
                f"{r['d_bestval']:+.2f} [{r['d_bestval_lo']:+.2f}, {r['d_bestval_hi']:+.2f}]"
                if r.get("d_bestval") is not None
                else "–"
            )
            lines.append(
                f"| {name} | {r['n']} | {lb} | {r.get('converged') or '–'} | {_fmt(r.get('grad_ratio'))} | "
                f"{_fmt(r.get('ratio_vs_control'))} | {r['verdicts'] or '–'} | "
                f"{_fmt(100 * r['final_test'] if r.get('final_test') is not None else None)} | "
                f"{df} | {db} |"
            )
        lines.append("")
    lines += [
        f"![paired difference vs train loss]({rel}/regime_delta.png)",
        f"![gradient ratio vs train loss]({rel}/regime_ratio.png)",
        "",
        END,
    ]
    return "\n".join(lines)


MARKERS = {
    "finetune": "o",
    "rifle-K1": "^",
    "rifle-K2": "v",
    "rifle-K1+reinit-init=norm_matched": "s",
    "rifle-K1+reinit-trigger=converged": "D",
    "lp-ft": "x",
}


def plots(rows: list[dict[str, Any]], cells: list[str], root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(cells, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name, ykey, ylabel, with_control in (
        ("regime_delta.png", "delta_final", "Δ final test accuracy vs fine-tuning (points)", False),
        ("regime_ratio.png", "grad_ratio", "backbone gradient ratio after / before", True),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        seen = set()
        for r in rows:
            if r.get("train_loss_before") is None or r.get(ykey) is None:
                continue
            if r["method"] == BASELINE and not with_control:
                continue
            m = r["method"]
            key = (r["cell"], m)
            ax.scatter(
                r["train_loss_before"],
                r[ykey],
                marker=MARKERS.get(m, "*"),
                color=colors[r["cell"]],
                s=36,
                alpha=0.8,
                label=f"{r['cell']}: {m}" if key not in seen else None,
            )
            seen.add(key)
        ax.axhline(1.0 if ykey == "grad_ratio" else 0.0, color="grey", lw=0.8, ls="--")
        ax.axvline(0.2, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("train loss in the epoch before the (first) re-init (log; dotted: 'converged' ≤ 0.2)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=6, ncol=2, loc="best")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / name, dpi=90)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="folder holding one rifle bench output folder per cell")
    ap.add_argument("--page", type=Path, help="Markdown page to write between its regime markers")
    args = ap.parse_args(argv)
    cells = [p.name for p in sorted(args.root.iterdir()) if (p / "grid.yaml").is_file()]
    if not cells:
        print(f"{args.root}: no cell folders (a grid.yaml written by rifle bench) below it", file=sys.stderr)
        return 2
    order = list(MARKERS)
    rows, selected = [], {}
    for cell in cells:
        rep = write_report(args.root / cell)
        selected[cell] = next((s["labels"][s["selected_k"]] for s in rep["sweeps"]), None)
        rows += run_rows(cell, collect(args.root / cell))
    buf = io.StringIO()
    w = csv.DictWriter(buf, RUN_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(
        sorted(
            rows,
            key=lambda r: (r["cell"], order.index(r["method"]) if r["method"] in order else 99, r["seed"]),
        )
    )
    (args.root / "regime_runs.csv").write_text(buf.getvalue())
    summary = summary_rows(rows, selected)
    buf = io.StringIO()
    w = csv.DictWriter(buf, sorted({k for r in summary for k in r}))
    w.writeheader()
    w.writerows(summary)
    (args.root / "regime_summary.csv").write_text(buf.getvalue())
    plots(rows, cells, args.root)
    if args.page:
        update_page(args.page, markdown(summary, cells, order, args.root, args.page), BEGIN, END)
    print(json.dumps({c: sum(1 for r in rows if r["cell"] == c) for c in cells}), "runs per cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
