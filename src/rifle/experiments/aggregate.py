"""The numbers of ``rifle report``: per cell (dataset, model, train fraction) and method, mean ± std and
Student-t intervals over seeds, the paired difference against the baseline (:mod:`.stats`, on
scipy.stats), K of RIFLE selected on validation, and the CSV files. See docs/experiments.md, "The report"."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .collect import Collected, RunRecord
from .stats import mean_std, pair_by_key, paired_difference, t_interval

_IGNORED_FOR_SWEEP = {
    "reinits",
    "seed",
    "out",
    "extra",
    "threads",
    "device",
    "eval_batch_size",
    "resolved_methods",
    "world_size",
}


def _sweep_signature(config: dict[str, Any]) -> str:
    core = {k: v for k, v in config.items() if k not in _IGNORED_FOR_SWEEP}
    methods = {
        m: {k: v for k, v in (o or {}).items() if not (m == "rifle" and k == "reinits")}
        for m, o in (config.get("resolved_methods") or {}).items()
    }
    return json.dumps([core, methods], sort_keys=True, default=str)


def _sweep_name(labels: list[str]) -> str:
    first = labels[0]
    return re.sub(r"K\d+", "K*", first, count=1) if re.search(r"K\d+", first) else f"{first}[K*]"


def finite_number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _by_seed(runs: list[RunRecord], key: str) -> dict[int, float]:
    return {r.seed: float(r.summary[key]) for r in runs if finite_number(r.summary.get(key)) is not None}


def _ordered(labels: Any, baseline: str | None, order: list[str] | None) -> list[str]:
    """The baseline first, then the grid's order, then the rest alphabetically."""
    rank = {label: i for i, label in enumerate(order or [])}
    return sorted(labels, key=lambda lab: (lab != baseline, rank.get(lab, len(rank)), lab))


def _paired_fields(name: str, a: dict[int, float], b: dict[int, float], confidence: float) -> dict[str, Any]:
    """``diff_<name>_{n,mean,ci_low,ci_high,p,p_wilcoxon}`` of ``a - b`` paired on their common seeds."""
    seeds, x, y = pair_by_key(a, b)
    d = paired_difference(x, y, confidence) if seeds else None
    return {
        f"diff_{name}_n": len(seeds),
        f"diff_{name}_mean": d.mean if d else math.nan,
        f"diff_{name}_ci_low": d.ci_low if d else math.nan,
        f"diff_{name}_ci_high": d.ci_high if d else math.nan,
        f"diff_{name}_p": d.p_t if d else math.nan,
        f"diff_{name}_p_wilcoxon": d.p_wilcoxon if d else math.nan,
    }


def aggregate(
    col: Collected, baseline: str | None = None, order: list[str] | None = None, confidence: float = 0.95
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(rows, sweeps)``: one row per cell x method (plus one per K sweep: the K selected on val)."""
    cells: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in col.runs:
        cells[r.cell][r.label].append(r)
    rows, sweeps = [], []
    for cell in sorted(cells):
        by_label = cells[cell]
        labels = _ordered(by_label, baseline, order)
        base = by_label.get(baseline) if baseline else None
        for label in labels:
            rows.append(_row(cell, label, by_label[label], base, baseline, confidence))
        # K sweeps: rifle entries whose configs differ only in reinits
        groups: dict[str, dict[int, str]] = defaultdict(dict)
        for label in labels:
            cfg = by_label[label][0].config
            if cfg.get("method") == "rifle" and isinstance(cfg.get("reinits"), int):
                groups[_sweep_signature(cfg)][cfg["reinits"]] = label
        for ks in groups.values():
            if len(ks) < 2:
                continue
            ks = dict(sorted(ks.items()))
            common = set.intersection(*({r.seed for r in by_label[lab]} for lab in ks.values()))
            if not common:
                continue
            val = {
                k: mean_std([v for s, v in _by_seed(by_label[lab], "best_val_acc").items() if s in common])[0]
                for k, lab in ks.items()
            }
            val = {k: v for k, v in val.items() if math.isfinite(v)}
            if not val:
                continue
            best_k = max(val, key=lambda k: (val[k], -k))
            name = _sweep_name(list(ks.values()))
            chosen = [r for r in by_label[ks[best_k]] if r.seed in common]
            row = _row(cell, name, chosen, base, baseline, confidence)
            row.update(kind="selected-on-val", selected_k=best_k, selected_label=ks[best_k])
            rows.append(row)
            sweeps.append(
                {
                    "dataset": cell[0],
                    "model": cell[1],
                    "train_fraction": cell[2],
                    "name": name,
                    "labels": ks,
                    "mean_best_val": val,
                    "selected_k": best_k,
                    "seeds": sorted(common),
                }
            )
    return rows, sweeps


def _row(
    cell: tuple,
    label: str,
    runs: list[RunRecord],
    base: list[RunRecord] | None,
    baseline: str | None,
    confidence: float,
) -> dict[str, Any]:
    dataset, model, frac = cell
    final, at_best, best_val = (
        _by_seed(runs, k) for k in ("final_test_acc", "test_acc_at_best_val", "best_val_acc")
    )
    row: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "train_fraction": frac,
        "method": label,
        "kind": "run",
        "n": len(runs),
        "seeds": " ".join(str(s) for s in sorted(final)),
    }
    for name, values in (("final_test", final), ("bestval_test", at_best), ("best_val", best_val)):
        m, sd, _ = mean_std(list(values.values()))
        lo, hi = t_interval(list(values.values()), confidence) if len(values) >= 2 else (math.nan, math.nan)
        row.update({f"{name}_mean": m, f"{name}_std": sd, f"{name}_ci_low": lo, f"{name}_ci_high": hi})
    if base is not None and label != baseline:
        for name, key in (("final", "final_test_acc"), ("bestval", "test_acc_at_best_val")):
            row.update(_paired_fields(name, _by_seed(runs, key), _by_seed(base, key), confidence))
    row["selected_k"] = None
    row["selected_label"] = None
    return row


CSV_COLUMNS = [
    "dataset",
    "model",
    "train_fraction",
    "method",
    "kind",
    "selected_k",
    "selected_label",
    "n",
    "seeds",
    "final_test_mean",
    "final_test_std",
    "final_test_ci_low",
    "final_test_ci_high",
    "bestval_test_mean",
    "bestval_test_std",
    "bestval_test_ci_low",
    "bestval_test_ci_high",
    "best_val_mean",
    "best_val_std",
    "diff_final_n",
    "diff_final_mean",
    "diff_final_ci_low",
    "diff_final_ci_high",
    "diff_final_p",
    "diff_final_p_wilcoxon",
    "diff_bestval_n",
    "diff_bestval_mean",
    "diff_bestval_ci_low",
    "diff_bestval_ci_high",
    "diff_bestval_p",
    "diff_bestval_p_wilcoxon",
]


def to_csv(rows: list[dict[str, Any]], columns: list[str] = CSV_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: (
                    ""
                    if isinstance(r.get(k), float) and not math.isfinite(r[k])
                    else ""
                    if r.get(k) is None
                    else f"{r[k]:.6g}"
                    if isinstance(r.get(k), float)
                    else r.get(k)
                )
                for k in columns
            }
        )
    return buf.getvalue()


DEPTH_COLUMNS = [
    "dataset",
    "model",
    "train_fraction",
    "method",
    "n",
    "seeds",
    "epoch",
    "rel_first_mean",
    "rel_first_std",
    "rel_middle_mean",
    "rel_middle_std",
    "rel_last_mean",
    "rel_last_std",
    "head_rel_mean",
    "diff_rel_first_n",
    "diff_rel_first_mean",
    "diff_rel_first_ci_low",
    "diff_rel_first_ci_high",
    "diff_rel_first_p",
    "watch_epochs",
    "grad_n",
    "grad_first_mean",
    "grad_middle_mean",
    "grad_last_mean",
    "grad_head_mean",
]


def depth_rows(
    col: Collected,
    baseline: str | None,
    order: list[str] | None = None,
    confidence: float = 0.95,
    monitors: dict[Path, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per cell x method, from the runs' ``depth.jsonl`` (``--record-depth``): mean +- std over seeds of
    the relative weight change of the first / middle / last backbone third after the last epoch, the
    paired difference of the first third against the baseline, and the mean over seeds of the gradient
    ratio after / before the (re-init) epoch boundaries (see :func:`rifle.analysis.depth.summarize_monitor`).
    ``monitors``: ``{run path: read_monitor(run path)}`` when already read.
    """
    from ..analysis.depth import read_monitor, summarize_monitor

    cells: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in col.runs:
        summ = summarize_monitor(monitors[r.path] if monitors is not None else read_monitor(r.path))
        if summ is not None:
            cells[r.cell][r.label][r.seed] = summ
    rows = []
    for cell in sorted(cells):
        by_label = cells[cell]
        base = by_label.get(baseline) if baseline else None
        for label in _ordered(by_label, baseline, order):
            seeds = by_label[label]
            row: dict[str, Any] = {
                "dataset": cell[0],
                "model": cell[1],
                "train_fraction": cell[2],
                "method": label,
                "n": len(seeds),
                "seeds": " ".join(map(str, sorted(seeds))),
                "epoch": max(v["epoch"] for v in seeds.values()),
            }
            for i, part in enumerate(("first", "middle", "last")):
                m, sd, _ = mean_std([v["rel_change"][i] for v in seeds.values()])
                row.update({f"rel_{part}_mean": m, f"rel_{part}_std": sd})
            row["head_rel_mean"] = mean_std(
                [v["head_rel_change"] for v in seeds.values() if v["head_rel_change"] is not None]
            )[0]
            if base is not None and label != baseline:
                row.update(
                    _paired_fields(
                        "rel_first",
                        {k: v["rel_change"][0] for k, v in seeds.items()},
                        {k: v["rel_change"][0] for k, v in base.items()},
                        confidence,
                    )
                )
            grads = [v for v in seeds.values() if v["grad_ratio"] is not None]
            watch = sorted({tuple(v["watch_epochs"] or ()) for v in grads})
            row.update(
                {"grad_n": len(grads), "watch_epochs": "; ".join(" ".join(map(str, w)) for w in watch)}
            )
            for i, part in enumerate(("first", "middle", "last")):
                row[f"grad_{part}_mean"] = mean_std([v["grad_ratio"][i] for v in grads])[0]
            row["grad_head_mean"] = mean_std(
                [v["head_grad_ratio"] for v in grads if v["head_grad_ratio"] is not None]
            )[0]
            rows.append(row)
    return rows
