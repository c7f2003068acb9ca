"""The numbers of ``rifle report``: per cell (dataset, model, train fraction) and method, mean ± std and
Student-t intervals over seeds, the paired difference against the baseline (:mod:`.stats`, on
scipy.stats), K of RIFLE selected on validation, and the CSV files. See docs/experiments.md, "The report"."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .collect import Collected, RunRecord
from .stats import (
    BOOTSTRAP_B,
    bootstrap_paired,
    mean_std,
    pair_by_key,
    paired_difference,
    sign_test,
    t_interval,
)

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
    """``diff_<name>_{n,mean,std,ci_low,ci_high,p,p_wilcoxon}`` of ``a - b`` paired on their common seeds,
    and the sign test over them: ``diff_<name>_sign_{pos,neg,ties}``, ``diff_<name>_p_sign``."""
    seeds, x, y = pair_by_key(a, b)
    d = paired_difference(x, y, confidence) if seeds else None
    sg = sign_test([u - v for u, v in zip(x, y)])
    return {
        f"diff_{name}_n": len(seeds),
        f"diff_{name}_mean": d.mean if d else math.nan,
        f"diff_{name}_std": d.std if d else math.nan,
        f"diff_{name}_ci_low": d.ci_low if d else math.nan,
        f"diff_{name}_ci_high": d.ci_high if d else math.nan,
        f"diff_{name}_p": d.p_t if d else math.nan,
        f"diff_{name}_p_wilcoxon": d.p_wilcoxon if d else math.nan,
        f"diff_{name}_sign_pos": sg.positive,
        f"diff_{name}_sign_neg": sg.negative,
        f"diff_{name}_sign_ties": sg.ties,
        f"diff_{name}_p_sign": sg.p,
    }


# the paired quantities of a method row: name -> (summary.json key, predictions.npz array, its labels)
PAIRED = {
    "final": ("final_test_acc", "test_final", "test_labels"),
    "bestval": ("test_acc_at_best_val", "test_best_val", "test_labels"),
    "val_final": ("final_val_acc", "val_final", "val_labels"),
    "val_best": ("best_val_acc", "val_best_val", "val_labels"),
}
# each test quantity and the validation quantity it is checked against (sign_flag_<test name>)
VAL_OF = {"final": "val_final", "bestval": "val_best"}


NO_PREDICTIONS = "no predictions.npz (runs older than the file)"


def checked_predictions(run: RunRecord, name: str) -> tuple[Any, Any, str | None]:
    """``(predictions, labels, None)`` of quantity ``name`` (:data:`PAIRED`) of ``run``, or
    ``(None, None, why not)``: :data:`NO_PREDICTIONS`, no such array, or its accuracy is not the one
    ``summary.json`` records (more than half an image apart)."""
    import numpy as np

    key, arr, lab = PAIRED[name]
    preds = run.predictions()
    if preds is None:
        return None, None, NO_PREDICTIONS
    if arr not in preds or lab not in preds:
        return None, None, f"no {arr} in predictions.npz"
    p, y = np.asarray(preds[arr]), np.asarray(preds[lab])
    acc = finite_number(run.summary.get(key))
    if p.shape != y.shape or len(y) == 0 or acc is None or abs(acc * len(y) - int((p == y).sum())) >= 0.5:
        return None, None, f"predictions.npz's {arr} does not give summary.json's {key}"
    return p, y, None


def bootstrap_fields(
    name: str, runs: list[RunRecord], base: list[RunRecord], seeds: list[int], confidence: float, b: int
) -> dict[str, Any]:
    """``diff_<name>_boot_{low,high}`` (:func:`.stats.bootstrap_paired` over the paired ``seeds``) or
    nan with ``diff_<name>_boot_note`` saying why not."""
    out: dict[str, Any] = {f"diff_{name}_boot_low": math.nan, f"diff_{name}_boot_high": math.nan}
    if not seeds:
        return out
    mine, theirs = {r.seed: r for r in runs}, {r.seed: r for r in base}
    diffs, why = [], defaultdict(list)
    for s in seeds:
        pa, ya, why_a = checked_predictions(mine[s], name)
        pb, yb, why_b = checked_predictions(theirs[s], name)
        for r, w in ((mine[s], why_a), (theirs[s], why_b)):
            if w:
                why[w].append(f"{r.label}/seed{r.seed}")
        if why_a or why_b:
            continue
        if ya.shape != yb.shape or (ya != yb).any():
            why["the two runs' labels differ (not paired image by image)"].append(f"seed {s}")
            continue
        diffs.append((pa == ya).astype(int) - (pb == yb).astype(int))
    if b < 1:
        why["not computed (bootstrap=0)"] = []
    if why:
        out[f"diff_{name}_boot_note"] = "; ".join(
            f"{w}: {len(at)} of {2 * len(seeds)} runs"
            if w == NO_PREDICTIONS
            else f"{w}: {' '.join(at)}"
            if at
            else w
            for w, at in why.items()
        )
        return out
    lo, hi = bootstrap_paired(diffs, b=b, confidence=confidence)
    out.update({f"diff_{name}_boot_low": lo, f"diff_{name}_boot_high": hi})
    return out


def aggregate(
    col: Collected,
    baseline: str | None = None,
    order: list[str] | None = None,
    confidence: float = 0.95,
    bootstrap: int = BOOTSTRAP_B,
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
            rows.append(_row(cell, label, by_label[label], base, baseline, confidence, bootstrap))
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
            row = _row(cell, name, chosen, base, baseline, confidence, bootstrap)
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
    bootstrap: int = BOOTSTRAP_B,
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
    row["final_val_mean"], row["final_val_std"], _ = mean_std(list(_by_seed(runs, "final_val_acc").values()))
    if base is not None and label != baseline:
        for name, (key, _arr, _lab) in PAIRED.items():
            mine, theirs = _by_seed(runs, key), _by_seed(base, key)
            row.update(_paired_fields(name, mine, theirs, confidence))
            seeds = pair_by_key(mine, theirs)[0]
            row.update(bootstrap_fields(name, runs, base, seeds, confidence, bootstrap))
        for test, val in VAL_OF.items():
            t, v = row[f"diff_{test}_mean"], row[f"diff_{val}_mean"]
            row[f"sign_flag_{test}"] = bool(math.isfinite(t) and math.isfinite(v) and t * v < 0)
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
    "final_val_mean",
    "final_val_std",
    *(
        f"diff_{name}_{k}"
        for name in PAIRED
        for k in (
            *(("n", "mean", "ci_low", "ci_high", "p", "p_wilcoxon") if name.startswith("val_") else ()),
            "std",
            "boot_low",
            "boot_high",
            "sign_pos",
            "sign_neg",
            "sign_ties",
            "p_sign",
        )
    ),
    "sign_flag_final",
    "sign_flag_bestval",
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


def class_rows(col: Collected, baseline: str | None, order: list[str] | None = None) -> list[dict[str, Any]]:
    """Per cell x method, from the final-epoch test predictions: per-class recall and the share of test
    images predicted as each class, each the mean over the seeds that have ``predictions.npz``; plus
    one row ``method = None`` with the test split's own class shares. Cells without predictions: none."""
    import numpy as np

    from .stats import per_class

    cells: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in col.runs:
        cells[r.cell][r.label].append(r)
    out = []
    for cell in sorted(cells):
        by_label = cells[cell]
        rows: list[dict[str, Any]] = []
        labels_share = None
        for label in _ordered(by_label, baseline, order):
            got = []
            for r in sorted(by_label[label], key=lambda r: r.seed):
                p, y, why = checked_predictions(r, "final")
                if why is None:
                    got.append((r, p, y))
            if not got:
                continue
            classes = list(got[0][0].summary.get("classes") or [])
            k = max(len(classes), *(int(max(p.max(), y.max())) + 1 for _, p, y in got))
            classes += [str(i) for i in range(len(classes), k)]
            per = [per_class(p, y, k) for _, p, y in got]
            with warnings.catch_warnings():  # a class absent from the test split: nan recall, no warning
                warnings.simplefilter("ignore", RuntimeWarning)
                recall = [float(x) for x in np.nanmean([rc for rc, _ in per], axis=0)]
            share = [float(x) for x in np.mean([sh for _, sh in per], axis=0)]
            if labels_share is None:
                y0 = got[0][2]
                labels_share = [float((y0 == c).mean()) for c in range(k)]
            rows.append(
                {
                    "dataset": cell[0],
                    "model": cell[1],
                    "train_fraction": cell[2],
                    "method": label,
                    "n": len(got),
                    "classes": classes,
                    "recall": recall,
                    "predicted": share,
                }
            )
        if rows and labels_share is not None:
            rows.insert(0, {**rows[0], "method": None, "n": None, "recall": None, "predicted": labels_share})
            out += rows
    return out


def verdict_kind(text: str) -> str:
    """The kind of one verdict line (:func:`rifle.core.verdict.verdict`): whether the head had converged
    and the clause after the dash, without the numbers, e.g. ``head converged, backprop in depth
    delivered``."""
    body = re.sub(r"^re-init \d+ \([^)]*\):\s*", "", text)
    head = (
        "head not converged"
        if "head had not converged" in body
        else "head converged"
        if "head had converged" in body
        else "head convergence not measured"
    )
    if " — " in body:
        tail = re.sub(r"\s*\([^)]*\)", "", body.split(" — ", 1)[1].split(";")[0]).strip()
    else:
        tail = "gradient not measured" if "gradient not measured" in body else "no ratio"
    return f"{head}, {tail}"


def _diagnoses(run: RunRecord) -> list[dict[str, Any]]:
    d = run.summary.get("rifle_diagnosis")
    return [d] if isinstance(d, dict) else [e for e in d or [] if isinstance(e, dict)]


def _interval(row: dict[str, Any], name: str) -> tuple[float, float]:
    """The interval the decision reads: the union of the bootstrap's and the t interval (an effect counts
    only where both exclude 0: with few seeds the bootstrap's seed level has few distinct resamples and
    is the narrower one; without predictions only the t interval exists)."""
    pairs = [
        (row.get(f"diff_{name}_{k}_low" if k else f"diff_{name}_ci_low", math.nan),
         row.get(f"diff_{name}_{k}_high" if k else f"diff_{name}_ci_high", math.nan))
        for k in ("boot", "")
    ]  # fmt: skip
    pairs = [(lo, hi) for lo, hi in pairs if isinstance(lo, float) and math.isfinite(lo)]
    if not pairs:
        return math.nan, math.nan
    return min(lo for lo, _ in pairs), max(hi for _, hi in pairs)


def _short_period_warning(runs: list[RunRecord]) -> str | None:
    from ..core.schedule import DEFAULT_MIN_STEPS_AFTER
    from .collect import steps_after_reinits

    short, least, limit = [], None, None
    for r in runs:
        rc = (r.summary.get("methods") or {}).get("rifle") or {}
        need = rc.get("min_steps_after", DEFAULT_MIN_STEPS_AFTER)
        steps = steps_after_reinits(r.summary, r.config)
        if not need or not steps or min(steps) >= need:
            continue
        short.append(r.seed)
        least = min(steps) if least is None else min(least, min(steps))
        limit = need
    if not short:
        return None
    return (
        f"re-convergence period below --min-steps-after: {len(short)} of {len(runs)} {runs[0].label} runs "
        f"(seeds {' '.join(map(str, sorted(short)))}) have as few as {least} optimizer steps after a "
        f"re-init, fewer than {limit}: the new head may not re-converge, so the comparison says little "
        "about RIFLE (train longer or use fewer re-inits)"
    )


def _unusable_runs(col: Collected, cell: tuple, labels: set[str]) -> list[str]:
    from .collect import path_identity

    out = []
    for rel, msg in sorted(col.failed.items()):
        ident = path_identity(rel)
        if ident is not None and ident[:3] == cell and ident[3] in labels:
            kind = "diverged" if re.search(r"diverged|non-finite", msg) else "failed"
            out.append(f"a {kind} run, not counted: `{rel}` ({msg})")
    for rel in sorted(col.unfinished):
        ident = path_identity(rel)
        if ident is not None and ident[:3] == cell and ident[3] in labels:
            missing = col.root is not None and not (col.root / rel / "summary.json").is_file()
            out.append(
                f"an incomplete run, not counted: `{rel}`"
                + (" (no summary.json)" if missing else " (summary.json says it did not complete)")
            )
    return out


def decisions(
    col: Collected,
    rows: list[dict[str, Any]],
    baseline: str | None,
    grid_seeds: list[int] | None = None,
    classes: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One decision per row compared against the baseline: the numbers it rests on, the runs' verdicts
    by kind, every warning that weakens it and a plain-words conclusion (:func:`conclusion`). Validation
    is what may be selected on; test is only reported."""
    from .stats import min_detectable_difference, seeds_needed

    by: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in col.runs:
        by[r.cell][r.label].append(r)
    out = []
    for row in rows:
        if "diff_final_n" not in row:
            continue
        cell = (row["dataset"], row["model"], row["train_fraction"])
        label = row["selected_label"] or row["method"]
        seeds = {int(s) for s in row["seeds"].split()}
        base = [r for r in by[cell].get(baseline or "", []) if r.seed in seeds]
        runs = [r for r in by[cell][label] if r.seed in seeds]
        paired = {r.seed for r in base}
        runs = [r for r in runs if r.seed in paired]
        base = [r for r in base if r.seed in {r.seed for r in runs}]
        n = row["diff_final_n"]
        warn: list[str] = []
        for group in (runs, base):
            w = _short_period_warning(group) if group else None
            if w:
                warn.append(w)
        notes: Counter = Counter()
        for r in runs + base:
            for note in (r.summary.get("data_info") or {}).get("warnings") or []:
                notes[re.sub(r"\bseed \d+", "seed …", note)] += 1
            sizes = (r.summary.get("data_info") or {}).get("sizes") or {}
            if sizes.get("val") == 0:
                notes["no validation split: there is nothing to select an epoch or a method on"] += 1
        warn += [f"{note} ({k} of {len(runs) + len(base)} runs)" for note, k in notes.items()]
        warn += _unusable_runs(col, cell, {label, baseline or ""})
        if grid_seeds and len(set(grid_seeds) - paired) and n < len(grid_seeds):
            warn.append(f"only {n} of the grid's {len(grid_seeds)} seeds are paired (both runs complete)")
        if n < 2:
            warn.append(f"{n} paired seed{'s' if n != 1 else ''}: no interval, no test")
        kinds: Counter = Counter()
        no_verdict, unfired = 0, Counter[str]()
        for r in runs:
            ds = _diagnoses(r)
            no_verdict += not ds
            kinds.update(verdict_kind(str(d.get("verdict", ""))) for d in ds)
            trig = r.summary.get("rifle_trigger")
            if isinstance(trig, dict) and not trig.get("fired"):
                unfired[
                    re.sub(r"\s*\(best [^)]*\)", "", str(trig.get("reason") or "no reason recorded"))
                ] += 1
        d: dict[str, Any] = {
            "dataset": cell[0],
            "model": cell[1],
            "train_fraction": cell[2],
            "method": row["method"],
            "selected_k": row["selected_k"],
            "n": n,
            "baseline": baseline,
            "is_rifle": any(r.config.get("method") == "rifle" for r in runs),
            "verdicts": dict(kinds.most_common()),
            "runs_without_verdict": no_verdict,
            "unfired": dict(unfired),
            "warnings": warn,
            "bootstrap_notes": list(
                dict.fromkeys(row[f"diff_{q}_boot_note"] for q in PAIRED if row.get(f"diff_{q}_boot_note"))
            ),
        }
        val_q = "val_final" if row.get("diff_val_final_n") else "val_best"
        d["val_quantity"] = val_q
        for q in ("final", val_q):
            sd, m = row.get(f"diff_{q}_std", math.nan), row.get(f"diff_{q}_n", 0)
            mde = min_detectable_difference(sd, m) if m >= 2 and math.isfinite(sd) else math.nan
            need = seeds_needed(0.01, sd) if m >= 2 and math.isfinite(sd) and sd > 0 else None
            d[f"mde_{'val' if q == val_q else q}"], d[f"seeds_1pt_{'val' if q == val_q else q}"] = mde, need
        d["majority"] = _majority_shift(classes or [], cell, label, baseline)
        d["conclusion"] = conclusion(row, d)
        out.append(d)
    return out


def _majority_shift(
    classes: list[dict[str, Any]], cell: tuple, label: str, baseline: str | None
) -> dict[str, Any] | None:
    """The test labels' majority class and the share of test images each method predicts as it (mean
    over seeds, :func:`class_rows`); None without predictions."""
    rows = {r["method"]: r for r in classes if (r["dataset"], r["model"], r["train_fraction"]) == cell}
    if None not in rows or label not in rows or baseline not in rows:
        return None
    shares = rows[None]["predicted"]
    c = max(range(len(shares)), key=lambda i: shares[i])
    return {
        "class": rows[None]["classes"][c],
        "labels": shares[c],
        "method": rows[label]["predicted"][c],
        "baseline": rows[baseline]["predicted"][c],
    }


def conclusion(row: dict[str, Any], d: dict[str, Any]) -> str:
    """The plain-words line of a decision: on final-epoch validation (what may be selected on), checked
    against final test; never a selection on test."""
    vq = d.get("val_quantity", "val_final")
    vm, tm = row.get(f"diff_{vq}_mean", math.nan), row.get("diff_final_mean", math.nan)
    vlo, vhi = _interval(row, vq)
    on_val = "validation" if vq == "val_final" else "best validation (no final-epoch validation recorded)"
    tlo, thi = _interval(row, "final")
    weak = "weak comparison (see the warnings): " if d["warnings"] else ""
    who = row["method"]
    if not math.isfinite(tm):
        return "no paired seeds: nothing to compare."
    same = all(
        row.get(f"diff_{q}_n") and row.get(f"diff_{q}_mean") == 0 and row.get(f"diff_{q}_std") in (0, None)
        for q in ("final", vq)
    ) and all(row.get(f"diff_{q}_sign_ties") == row.get(f"diff_{q}_n") for q in ("final", vq))
    if same:
        return f"{weak}{who} gave exactly {d.get('baseline')}'s accuracies in every seed: nothing to choose."
    t_clear = math.isfinite(tlo) and (tlo > 0 or thi < 0)
    test_alone = f"test alone shows {100 * tm:+.2f} points" + (
        ", its interval excluding 0" if t_clear else ""
    )
    if not math.isfinite(vm):
        return (
            f"{weak}no validation accuracy: nothing to select on; {test_alone}, which is not a basis for "
            "choosing a method."
        )
    if vm * tm < 0:
        return (
            f"{weak}{on_val} ({100 * vm:+.2f}) and test ({100 * tm:+.2f}) disagree in sign: do not select "
            "on this."
        )
    v_clear = math.isfinite(vlo) and (vlo > 0 or vhi < 0)
    word = "gain" if vm > 0 else "loss"
    if v_clear and t_clear:
        return (
            f"{weak}evidence of a {word}: {who} is {100 * vm:+.2f} points on {on_val} and "
            f"{100 * tm:+.2f} on test, both intervals exclude 0."
        )
    if v_clear:
        return (
            f"{weak}{on_val} shows a {word} of {100 * vm:+.2f} points, test does not confirm it "
            f"({100 * tm:+.2f}, its interval covers 0): at most weak evidence."
        )
    need = d.get("seeds_1pt_val")
    if need is None or not math.isfinite(d.get("mde_val", math.nan)):
        more = ""
    elif d["mde_val"] <= 0.01:
        more = f"; {d['n']} seeds could detect a 1-point difference, so an effect is likely smaller"
    else:
        more = f"; about {need - d['n']} more seeds would detect a 1-point difference on validation"
        t_need = d.get("seeds_1pt_final")
        if t_need is not None and d.get("mde_final", 0) > 0.01:
            more += f" ({t_need - d['n']} on test)"
    clear_test = f"; {test_alone}, which is not a basis for selection" if t_clear else ""
    return f"{weak}no evidence either way on {on_val}{clear_test}{more}."


REFERENCE_COLUMNS = [
    "dataset",
    "as_published",
    "source",
    "citation",
    "url",
    "method",
    "published",
    "published_pm",
    "published_runs",
    "train_fraction",
    "compare_with",
    "model",
    "ours_n",
    "ours_final_test_mean",
    "ours_final_test_std",
    "ours_final_test_ci_low",
    "ours_final_test_ci_high",
    "ours_minus_published",
    "note",
]


def reference_rows(
    reference: Any, rows: list[dict[str, Any]], dataset_keys: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The grid's published numbers (``reference:``, a :class:`rifle.experiments.grid.Reference`) beside
    our mean final test accuracy of the method each names (``compare_with``), one row per published
    number and model of the grid; accuracies in %, ``ours_minus_published`` in points. These rows are
    never part of our statistics (``rows`` is only read)."""
    from .grid import DatasetEntry

    if reference is None:
        return []
    keys = dict(dataset_keys or {})

    def key(name: str) -> str:
        return keys.get(name) or DatasetEntry(0, name, name).key

    out: list[dict[str, Any]] = []
    for ref in reference.rows:
        src = reference.sources[ref.source]
        base = {
            "dataset": ref.dataset,
            "as_published": ref.as_published or "",
            "source": ref.source,
            "citation": src.citation,
            "url": src.url or "",
            "method": ref.method,
            "published": ref.accuracy,
            "published_pm": ref.pm,
            "published_runs": ref.runs,
            "train_fraction": ref.train_fraction,
            "compare_with": ref.compare_with or "",
            "note": ref.note or "",
        }
        ours = [
            r
            for r in rows
            if ref.compare_with is not None
            and r.get("kind") == "run"
            and r["method"] == ref.compare_with
            and key(r["dataset"]) == ref.dataset
            and math.isclose(float(r["train_fraction"]), ref.train_fraction)
        ]
        if not ours:
            out.append({**base, "model": "", "ours_n": 0})
        for r in ours:
            m = 100 * r["final_test_mean"]
            out.append(
                {
                    **base,
                    "model": r["model"],
                    "ours_n": r["n"],
                    "ours_final_test_mean": m,
                    "ours_final_test_std": 100 * r["final_test_std"],
                    "ours_final_test_ci_low": 100 * r["final_test_ci_low"],
                    "ours_final_test_ci_high": 100 * r["final_test_ci_high"],
                    "ours_minus_published": m - ref.accuracy,
                }
            )
    return out
