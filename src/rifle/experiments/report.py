"""``rifle report DIR``: aggregate a grid folder into ``results.md``, ``results.csv`` and small PNGs.

Per (dataset, model, train fraction) cell and method: number of seeds, mean +- std (ddof=1) of the
final (last-epoch) test accuracy and of the test accuracy at the best-validation epoch, and the paired
difference against the baseline (mean, 95% t interval, paired t-test p; Wilcoxon p with >= 6 seeds).
When RIFLE entries differ only in K, K is selected on **validation** (highest mean ``best_val_acc``
over the seeds every K completed; ties -> smaller K) and reported with its test accuracy. Nothing is
ever selected on test.

Runs are found by their ``summary.json`` (``complete: true``); their identity comes from
``config.yaml`` (``extra.grid``, written by ``rifle bench``) or, failing that, from the folder layout
``<dataset>/<model>/frac<f>/<label>/seed<s>``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .stats import mean_std, pair_by_key, paired_difference, t_interval

PLOT_DPI = 90
_IGNORED_FOR_SWEEP = {"reinits", "seed", "out", "extra", "threads", "device", "eval_batch_size",
                      "resolved_methods", "world_size"}


@dataclass
class RunRecord:
    dataset: str
    model: str
    fraction: float
    label: str
    seed: int
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def cell(self) -> tuple[str, str, float]:
        return (self.dataset, self.model, self.fraction)

    def metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@dataclass
class Collected:
    runs: list[RunRecord] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _identity(path: Path, root: Path, config: dict[str, Any]) -> tuple[str, str, float, str, int] | None:
    g = (config.get("extra") or {}).get("grid")
    parts = path.relative_to(root).parts
    label = parts[-2] if len(parts) >= 2 else config.get("method", "?")
    if isinstance(g, dict) and {"label", "dataset", "model", "train_fraction", "seed"} <= set(g):
        return str(g["dataset"]), str(g["model"]), float(g["train_fraction"]), str(g["label"]), int(g["seed"])
    if len(parts) >= 5 and parts[-3].startswith("frac") and parts[-1].startswith("seed"):
        try:
            return parts[-5], parts[-4], float(parts[-3][4:]), label, int(parts[-1][4:])
        except ValueError:
            pass
    if config:
        return (str(config.get("data")), str(config.get("model")), float(config.get("train_fraction", 1.0)),
                label, int(config.get("seed", 0)))
    return None


def collect(root: str | Path) -> Collected:
    """Every run folder under ``root`` (complete ones in ``runs``, the rest listed)."""
    root = Path(root)
    out = Collected()
    folders = sorted({p.parent for name in ("summary.json", "config.yaml", "error.txt")
                      for p in root.rglob(name)})
    for folder in folders:
        rel = str(folder.relative_to(root))
        summary = None
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            pass
        if (folder / "error.txt").is_file() and not (summary or {}).get("complete"):
            out.failed[rel] = (folder / "error.txt").read_text().splitlines()[0][:200]
            continue
        if not summary or not summary.get("complete"):
            out.unfinished.append(rel)
            continue
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        ident = _identity(folder, root, config)
        if ident is None:
            out.unfinished.append(rel)
            continue
        out.runs.append(RunRecord(*ident, path=folder, summary=summary, config=config))
    return out


def _grid_info(root: Path) -> dict[str, Any]:
    p = root / "grid.yaml"
    if not p.is_file():
        return {}
    try:
        from .grid import parse_grid
        spec = yaml.safe_load(p.read_text()) or {}
        grid = parse_grid(spec, source=str(p))
        return {"spec": spec, "labels": [e.label for e in grid.methods], "baseline": grid.baseline,
                "seeds": grid.seeds, "train": grid.train, "source": _source_line(p)}
    except Exception as e:  # noqa: BLE001 - a report must still come out of a folder with an odd grid
        return {"error": f"{type(e).__name__}: {e}"}


def _source_line(p: Path) -> str | None:
    first = p.read_text().splitlines()[:1]
    m = re.match(r"# copied by `rifle bench` from (.*)", first[0]) if first else None
    return m.group(1) if m else None


def _sweep_signature(config: dict[str, Any]) -> str:
    core = {k: v for k, v in config.items() if k not in _IGNORED_FOR_SWEEP}
    methods = {m: {k: v for k, v in (o or {}).items() if not (m == "rifle" and k == "reinits")}
               for m, o in (config.get("resolved_methods") or {}).items()}
    return json.dumps([core, methods], sort_keys=True, default=str)


def _sweep_name(labels: list[str]) -> str:
    first = labels[0]
    return re.sub(r"K\d+", "K*", first, count=1) if re.search(r"K\d+", first) else f"{first}[K*]"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ aggregation
def _by_seed(runs: list[RunRecord], key: str) -> dict[int, float]:
    return {r.seed: float(r.summary[key]) for r in runs if _num(r.summary.get(key)) is not None}


def _ordered(labels: Any, baseline: str | None, order: list[str] | None) -> list[str]:
    """The baseline first, then the grid's order, then the rest alphabetically."""
    rank = {label: i for i, label in enumerate(order or [])}
    return sorted(labels, key=lambda lab: (lab != baseline, rank.get(lab, len(rank)), lab))


def _paired_fields(name: str, a: dict[int, float], b: dict[int, float], confidence: float) -> dict[str, Any]:
    """``diff_<name>_{n,mean,ci_low,ci_high,p,p_wilcoxon}`` of ``a - b`` paired on their common seeds."""
    seeds, x, y = pair_by_key(a, b)
    d = paired_difference(x, y, confidence) if seeds else None
    return {f"diff_{name}_n": len(seeds),
            f"diff_{name}_mean": d.mean if d else math.nan,
            f"diff_{name}_ci_low": d.ci_low if d else math.nan,
            f"diff_{name}_ci_high": d.ci_high if d else math.nan,
            f"diff_{name}_p": d.p_t if d else math.nan,
            f"diff_{name}_p_wilcoxon": d.p_wilcoxon if d else math.nan}


def aggregate(col: Collected, baseline: str | None = None, order: list[str] | None = None,
              confidence: float = 0.95) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
            val = {k: mean_std([v for s, v in _by_seed(by_label[lab], "best_val_acc").items()
                                if s in common])[0] for k, lab in ks.items()}
            val = {k: v for k, v in val.items() if math.isfinite(v)}
            if not val:
                continue
            best_k = max(val, key=lambda k: (val[k], -k))
            name = _sweep_name(list(ks.values()))
            chosen = [r for r in by_label[ks[best_k]] if r.seed in common]
            row = _row(cell, name, chosen, base, baseline, confidence)
            row.update(kind="selected-on-val", selected_k=best_k, selected_label=ks[best_k])
            rows.append(row)
            sweeps.append({"dataset": cell[0], "model": cell[1], "train_fraction": cell[2], "name": name,
                           "labels": ks, "mean_best_val": val, "selected_k": best_k,
                           "seeds": sorted(common)})
    return rows, sweeps


def _row(cell: tuple, label: str, runs: list[RunRecord], base: list[RunRecord] | None,
         baseline: str | None, confidence: float) -> dict[str, Any]:
    dataset, model, frac = cell
    final, at_best, best_val = (_by_seed(runs, k) for k in ("final_test_acc", "test_acc_at_best_val", "best_val_acc"))
    row: dict[str, Any] = {"dataset": dataset, "model": model, "train_fraction": frac, "method": label,
                           "kind": "run", "n": len(runs), "seeds": " ".join(str(s) for s in sorted(final))}
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


CSV_COLUMNS = ["dataset", "model", "train_fraction", "method", "kind", "selected_k", "selected_label", "n",
               "seeds", "final_test_mean", "final_test_std", "final_test_ci_low", "final_test_ci_high",
               "bestval_test_mean", "bestval_test_std", "bestval_test_ci_low", "bestval_test_ci_high",
               "best_val_mean", "best_val_std",
               "diff_final_n", "diff_final_mean", "diff_final_ci_low", "diff_final_ci_high", "diff_final_p",
               "diff_final_p_wilcoxon", "diff_bestval_n", "diff_bestval_mean", "diff_bestval_ci_low",
               "diff_bestval_ci_high", "diff_bestval_p", "diff_bestval_p_wilcoxon"]


def to_csv(rows: list[dict[str, Any]], columns: list[str] = CSV_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r.get(k), float) and not math.isfinite(r[k]) else
                        "" if r.get(k) is None else
                        f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k)) for k in columns})
    return buf.getvalue()


DEPTH_COLUMNS = ["dataset", "model", "train_fraction", "method", "n", "seeds", "epoch",
                 "rel_first_mean", "rel_first_std", "rel_middle_mean", "rel_middle_std",
                 "rel_last_mean", "rel_last_std", "head_rel_mean",
                 "diff_rel_first_n", "diff_rel_first_mean", "diff_rel_first_ci_low", "diff_rel_first_ci_high",
                 "diff_rel_first_p", "watch_epochs", "grad_n", "grad_first_mean", "grad_middle_mean",
                 "grad_last_mean", "grad_head_mean"]


def depth_rows(col: Collected, baseline: str | None, order: list[str] | None = None,
               confidence: float = 0.95, monitors: dict[Path, Any] | None = None) -> list[dict[str, Any]]:
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
            row: dict[str, Any] = {"dataset": cell[0], "model": cell[1], "train_fraction": cell[2],
                                   "method": label, "n": len(seeds), "seeds": " ".join(map(str, sorted(seeds))),
                                   "epoch": max(v["epoch"] for v in seeds.values())}
            for i, part in enumerate(("first", "middle", "last")):
                m, sd, _ = mean_std([v["rel_change"][i] for v in seeds.values()])
                row.update({f"rel_{part}_mean": m, f"rel_{part}_std": sd})
            row["head_rel_mean"] = mean_std([v["head_rel_change"] for v in seeds.values()
                                             if v["head_rel_change"] is not None])[0]
            if base is not None and label != baseline:
                row.update(_paired_fields("rel_first", {k: v["rel_change"][0] for k, v in seeds.items()},
                                          {k: v["rel_change"][0] for k, v in base.items()}, confidence))
            grads = [v for v in seeds.values() if v["grad_ratio"] is not None]
            watch = sorted({tuple(v["watch_epochs"] or ()) for v in grads})
            row.update({"grad_n": len(grads), "watch_epochs": "; ".join(" ".join(map(str, w)) for w in watch)})
            for i, part in enumerate(("first", "middle", "last")):
                row[f"grad_{part}_mean"] = mean_std([v["grad_ratio"][i] for v in grads])[0]
            row["grad_head_mean"] = mean_std([v["head_grad_ratio"] for v in grads
                                              if v["head_grad_ratio"] is not None])[0]
            rows.append(row)
    return rows


def depth_markdown(rows: list[dict[str, Any]], cell: tuple, baseline: str | None, confidence: float,
                   level: int = 3) -> list[str]:
    """The "backpropagation in depth" table of one cell (empty when no run recorded depth)."""
    rows = [r for r in rows if (r["dataset"], r["model"], r["train_fraction"]) == cell]
    if not rows:
        return []
    c = int(round(confidence * 100))
    out = [f"{'#' * level} Backpropagation in depth", "",
           "Relative weight change ‖W(T) − W(0)‖ / ‖W(0)‖ from the pretrained weights after the last epoch, "
           "mean over the conv/linear weights of the first / middle / last third of the backbone, in % "
           "(mean ± std over seeds); Δ first third: paired over seeds vs "
           f"{baseline} [{c}% CI], p. Gradient ratio: per layer, mean gradient norm in the recorded steps "
           "just after / just before each re-init epoch boundary (for runs without re-init: the same "
           "epoch boundary, the control), averaged over the layers of each third and over seeds; > 1 "
           "means a larger error signal reaches those layers after the re-init.", "",
           "| method | n | first third | middle third | last third | head | Δ first third [CI], p | "
           "epochs watched | grad ratio first / middle / last third | head grad ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grad = " / ".join(_ratio(r[f"grad_{k}_mean"]) for k in ("first", "middle", "last")) if r["grad_n"] else "-"
        out.append(f"| {r['method']} | {r['n']} | {_pct(r['rel_first_mean'], r['rel_first_std'])} | "
                   f"{_pct(r['rel_middle_mean'], r['rel_middle_std'])} | {_pct(r['rel_last_mean'], r['rel_last_std'])} | "
                   f"{_pct(r['head_rel_mean'])} | {_diff(r, 'rel_first', digits=3)} | {r['watch_epochs'] or '-'} | "
                   f"{grad} | {_ratio(r['grad_head_mean']) if r['grad_n'] else '-'} |")
    return out + [""]


# ------------------------------------------------------------------------------------------ text
def _pct(m: float, sd: float | None = None) -> str:
    if not math.isfinite(m):
        return "-"
    return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None and math.isfinite(sd) else "")


def _diff(row: dict[str, Any], name: str, digits: int = 2) -> str:
    m = row.get(f"diff_{name}_mean")
    if m is None or not math.isfinite(m):
        return "-"
    lo, hi, p = row[f"diff_{name}_ci_low"], row[f"diff_{name}_ci_high"], row[f"diff_{name}_p"]
    ci = f" [{100 * lo:+.{digits}f}, {100 * hi:+.{digits}f}]" if math.isfinite(lo) else ""
    pt = f", p={p:.3g}" if math.isfinite(p) else ""
    pw = row.get(f"diff_{name}_p_wilcoxon")
    pw = f", pW={pw:.3g}" if pw is not None and math.isfinite(pw) else ""
    return f"{100 * m:+.{digits}f}{ci}{pt}{pw}"


def _ratio(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "-"


def cell_slug(cell: tuple) -> str:
    from .grid import safe_name
    return safe_name(f"{cell[0]}_{cell[1]}_frac{cell[2]:g}")


def _recipe(col: Collected, info: dict[str, Any], baseline: str | None) -> list[str]:
    lines = []
    if info.get("train") is not None:
        lines.append(f"- grid `train:` keys: `{json.dumps(info['train'], sort_keys=True)}`")
    ref = next((r for r in col.runs if r.label == baseline), col.runs[0] if col.runs else None)
    if ref is not None:
        c = ref.config
        keys = ("model", "pretrained", "epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule",
                "image_size", "val_fraction", "channels_last", "amp", "grad_accum")
        lines.append("- resolved recipe (" + ref.label + "): " + ", ".join(f"{k}={c[k]}" for k in keys if k in c))
        pre = ref.summary.get("preprocessing") or {}
        if pre:
            lines.append(f"- preprocessing: resize {pre.get('resize')} -> crop {pre.get('image_size')} "
                         f"(train: random crop + flip; eval: centre crop), mean {pre.get('mean')}, std {pre.get('std')}")
        versions = ref.summary.get("versions") or {}
        lines.append(f"- software: {', '.join(f'{k} {v}' for k, v in versions.items())}; git {ref.summary.get('git')}")
    seeds = sorted({r.seed for r in col.runs})
    lines.append(f"- seeds: {info.get('seeds', seeds)} (complete runs exist for seeds {seeds})")
    return lines


def _split_lines(col: Collected) -> list[str]:
    seen, lines = set(), []
    for r in col.runs:
        di = r.summary.get("data_info") or {}
        key = (r.dataset, r.fraction, r.seed)
        if key in seen or not di:
            continue
        seen.add(key)
        if r.seed == min(x.seed for x in col.runs if (x.dataset, x.fraction) == (r.dataset, r.fraction)):
            s = di.get("sizes", {})
            lines.append(f"- {r.dataset}, train fraction {r.fraction:g}, seed {r.seed}: {s.get('train')} train / "
                         f"{s.get('val')} val / {s.get('test')} test images; validation {di.get('val')}; "
                         f"train fraction {di.get('train_fraction')} (stratified, seeded); the test split "
                         "does not depend on the seed")
    return lines


def cell_sections(rows: list[dict[str, Any]], sweeps: list[dict[str, Any]], baseline: str | None,
                  plots: dict[tuple, list[str]], confidence: float, depth: list[dict[str, Any]] | None = None,
                  level: int = 2, link_prefix: str = "") -> list[str]:
    """One section per cell: the accuracy table, the K selection, the depth table and the plots
    (linked as ``link_prefix + name``; ``level``: the heading level of the cell title)."""
    c = int(round(confidence * 100))
    out: list[str] = []
    cells = sorted({(r["dataset"], r["model"], r["train_fraction"]) for r in rows})
    for cell in cells:
        out += [f"{'#' * level} {cell[0]} / {cell[1]} / train fraction {cell[2]:g}", "",
                f"| method | n | final test | Δ final vs {baseline} [{c}% CI], p | test @ best val | "
                f"Δ @ best val [{c}% CI], p | best val |",
                "|---|---|---|---|---|---|---|"]
        for r in rows:
            if (r["dataset"], r["model"], r["train_fraction"]) != cell:
                continue
            name = f"**{r['method']}** (K={r['selected_k']} on val)" if r["kind"] == "selected-on-val" else r["method"]
            out.append(f"| {name} | {r['n']} | {_pct(r['final_test_mean'], r['final_test_std'])} | "
                       f"{_diff(r, 'final')} | {_pct(r['bestval_test_mean'], r['bestval_test_std'])} | "
                       f"{_diff(r, 'bestval')} | {_pct(r['best_val_mean'], r['best_val_std'])} |")
        for s in sweeps:
            if (s["dataset"], s["model"], s["train_fraction"]) == cell:
                vals = ", ".join(f"K={k}: {100 * v:.2f}" for k, v in s["mean_best_val"].items())
                out += ["", f"K selection for `{s['name']}` (mean best val acc over seeds {s['seeds']}): "
                        f"{vals} -> **K={s['selected_k']}**."]
        out.append("")
        out += depth_markdown(depth or [], cell, baseline, confidence, level + 1)
        for png in plots.get(cell, []):
            out += [f"![{png}]({link_prefix}{png})", ""]
    return out


def has_events(root: Path) -> bool:
    """True when a run below ``root`` wrote TensorBoard events (``rifle train --log-to tensorboard``)."""
    return any(p.is_dir() for p in Path(root).rglob("tb"))


def tensorboard_command(root: Path) -> str:
    import shlex
    return f"tensorboard --logdir {shlex.quote(str(root))}"


def render_markdown(root: Path, col: Collected, rows: list[dict[str, Any]], sweeps: list[dict[str, Any]],
                    baseline: str | None, info: dict[str, Any], plots: dict[tuple, list[str]],
                    confidence: float, depth: list[dict[str, Any]] | None = None) -> str:
    c = int(round(confidence * 100))
    out = [f"# Results: `{root}`", "",
           f"Regenerate: `rifle report {root}`"
           + (f" (the runs: `rifle bench {info['source']} --out {root}`)" if info.get("source") else ""),
           *(["", f"Curves of every run in TensorBoard: `{tensorboard_command(root)}`"] if has_events(root) else []),
           "", f"{len(col.runs)} complete runs"
           + (f", {len(col.unfinished)} unfinished" if col.unfinished else "")
           + (f", {len(col.failed)} failed" if col.failed else "") + ".", "", "## Recipe", ""]
    out += _recipe(col, info, baseline)
    out += ["", "## Split", ""] + (_split_lines(col) or ["- (no data_info in the summaries)"])
    out += ["", "## Protocol and selection rule", "",
            "- **final test**: test accuracy after the last epoch (the paper's protocol).",
            "- **test @ best val**: test accuracy at the epoch with the highest validation accuracy "
            "(ties: the later epoch); the epoch is selected on validation only.",
            f"- accuracies in %, mean ± sample std (ddof=1) over seeds; n = number of seeds.",
            f"- **Δ vs {baseline}**: paired over seeds (same split, same initial head, same data order "
            f"per seed): mean of per-seed differences in points, [{c}% Student-t interval], two-sided paired "
            "t-test p; pW = Wilcoxon signed-rank p when n ≥ 6.",
            "- **K of RIFLE**: when several RIFLE entries differ only in K, K is selected on VALIDATION: "
            "the highest mean best-validation accuracy over the seeds every K completed (ties: the "
            "smaller K); the row `…K*…` reports that K's test accuracy. Nothing is selected on test.",
            ""]
    out += cell_sections(rows, sweeps, baseline, plots, confidence, depth)
    if col.failed:
        out += ["## Failed runs", ""] + [f"- `{k}`: {v}" for k, v in sorted(col.failed.items())] + [""]
    if col.unfinished:
        out += ["## Unfinished runs (not counted)", ""] + [f"- `{k}`" for k in sorted(col.unfinished)] + [""]
    return "\n".join(out)


PAGE_BEGIN = "<!-- BEGIN rifle report: generated, do not edit by hand -->"
PAGE_END = "<!-- END rifle report -->"


def page_block(root: Path, page: Path, col: Collected, rows: list[dict[str, Any]], sweeps: list[dict[str, Any]],
               baseline: str | None, plots: dict[tuple, list[str]], confidence: float,
               depth: list[dict[str, Any]] | None) -> str:
    """The generated part of a hand-written page: counts, then :func:`cell_sections` (links relative to it)."""
    import os
    rel = Path(os.path.relpath(root.resolve(), page.resolve().parent)).as_posix()
    seeds = sorted({r.seed for r in col.runs})
    lines = [PAGE_BEGIN, "",
             f"{len(col.runs)} complete runs (seeds {seeds})"
             + (f", {len(col.unfinished)} unfinished" if col.unfinished else "")
             + (f", {len(col.failed)} failed" if col.failed else "")
             + f". Written by `rifle report {root} --page {page}`; the protocol, the recipe, the split and "
             f"every run are in [{rel}/results.md]({rel}/results.md), the numbers in "
             f"[{rel}/results.csv]({rel}/results.csv). Accuracies in %, mean ± std over seeds; Δ = paired "
             f"difference in points vs {baseline} with its {int(round(confidence * 100))}% t interval and "
             "p; K of RIFLE selected on validation, never on test.", ""]
    lines += cell_sections(rows, sweeps, baseline, plots, confidence, depth, level=3, link_prefix=f"{rel}/")
    return "\n".join(lines + [PAGE_END])


def update_page(page: str | Path, block: str, begin: str = PAGE_BEGIN, end: str = PAGE_END) -> None:
    """Replace the text between ``begin`` and ``end`` (default :data:`PAGE_BEGIN` / :data:`PAGE_END`) in
    ``page`` (created if absent; ``block`` includes the markers).

    The hand-written text around the markers is kept; a page without the markers is an error (nothing
    is overwritten).
    """
    from ..train.checkpoint import atomic_write_text
    page = Path(page)
    if not page.exists():
        page.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(page, f"# Results\n\n{block}\n")
        return
    text = page.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(end) < text.index(begin):
        raise ValueError(f"{page}: --page needs exactly one pair of markers to write between, in this order:\n"
                         f"  {begin}\n  {end}\n(the page is left unchanged)")
    atomic_write_text(page, text[:text.index(begin)] + block + text[text.index(end) + len(end):])


# ------------------------------------------------------------------------------------------ plots
def _colors(n: int):
    import matplotlib
    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _mean_curves(runs: list[RunRecord], key: str) -> tuple[list[int], list[float]]:
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for m in r.metrics():
            if _num(m.get(key)) is not None:
                per_epoch[int(m["epoch"])].append(float(m[key]))
    epochs = sorted(per_epoch)
    return epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]


def plot_curves(cell_runs: dict[str, list[RunRecord]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=PLOT_DPI)
    colors = _colors(len(labels))
    for label, color in zip(labels, colors):
        runs = cell_runs[label]
        reinits = sorted({e for r in runs for e in (r.summary.get("reinit_epochs") or [])})
        for ax, key in zip(axes, ("train_loss", "val_acc", "test_acc")):
            ep, ys = _mean_curves(runs, key)
            if not ep:
                continue
            ax.plot(ep, ys, color=color, lw=1.3, label=label)
            marks = [(e, y) for e, y in zip(ep, ys) if e in reinits]
            if marks:
                ax.plot(*zip(*marks), "v", color=color, markersize=6)
    for ax, name in zip(axes, ("train loss", "val acc", "test acc")):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (mean over seeds; ▼ = re-init epoch)", fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.82, 0.95))
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(0.83, 0.5), fontsize=7, frameon=False)
    fig.savefig(path, bbox_inches="tight")  # long labels: grow the canvas rather than cut them
    plt.close(fig)


def plot_accuracy(cell_rows: list[dict[str, Any]], path: Path, title: str, baseline: str | None,
                  confidence: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(reversed(cell_rows))
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(rows)), dpi=PLOT_DPI)
    ys = list(range(len(rows)))
    for off, key, marker, name in ((0.12, "final_test", "o", "final test"),
                                   (-0.12, "bestval_test", "s", "test @ best val")):
        m = [100 * r[f"{key}_mean"] for r in rows]
        lo = [100 * (r[f"{key}_mean"] - r[f"{key}_ci_low"]) if math.isfinite(r[f"{key}_ci_low"]) else 0 for r in rows]
        hi = [100 * (r[f"{key}_ci_high"] - r[f"{key}_mean"]) if math.isfinite(r[f"{key}_ci_high"]) else 0 for r in rows]
        ax.errorbar(m, [y + off for y in ys], xerr=[lo, hi], fmt=marker, ms=4, capsize=2, lw=1, label=name)
    base = next((r for r in rows if r["method"] == baseline), None)
    if base is not None and math.isfinite(base["final_test_mean"]):
        ax.axvline(100 * base["final_test_mean"], color="grey", ls="--", lw=0.8)
    lo_x, hi_x = ax.get_xlim()
    ax.set_xlim(max(lo_x, 0.0), min(hi_x, 100.0))
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['method']} (n={r['n']})" for r in rows], fontsize=7)
    ax.set_xlabel(f"test accuracy (%), mean and {int(confidence * 100)}% t interval over seeds", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_depth(profiles: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """``{label: [per-layer rel. change, one list per seed]}`` -> mean over seeds by layer depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.4 if len(profiles) <= 8 else 4.6), dpi=PLOT_DPI)
    for (label, seeds), color in zip(profiles.items(), _colors(len(profiles))):
        n = min(len(s) for s in seeds)
        mean = [sum(s[i] for s in seeds) / len(seeds) for i in range(n)]
        ax.plot(range(n), mean, color=color, lw=1.2, label=f"{label} (n={len(seeds)})")
    from ..analysis.depth_plots import finish_depth_axes
    finish_depth_axes(fig, ax, path, title,
                      "layer (conv / linear weights in forward order; the head is last)")
    plt.close(fig)


def _depth_profile(run: RunRecord, compute: bool, mon: dict[str, Any] | None) -> list[float] | None:
    from ..analysis.runs import load_profile, run_depth
    prof = load_profile(run.path, mon)
    if prof is None and compute:
        prof = [layer["rel_change"] for layer in run_depth(run.path)["layers"]]
    return prof


# ------------------------------------------------------------------------------------------ entry point
def write_report(root: str | Path, *, baseline: str | None = None, confidence: float = 0.95,
                 plots: bool = True, depth: bool = False, page: str | Path | None = None) -> dict[str, Any]:
    """Write ``results.md``, ``results.csv`` and the PNGs into ``root``; returns rows and paths.

    ``page``: also write the tables and plots between the markers of this hand-written Markdown page
    (:func:`update_page`).
    """
    from ..train.checkpoint import atomic_write_text
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    col = collect(root)
    if not col.runs and not col.unfinished and not col.failed:
        raise FileNotFoundError(f"{root}: no runs found (no summary.json below it)")
    info = _grid_info(root)
    if baseline is None:
        baseline = info.get("baseline")
        if baseline is None and any(r.label == "finetune" for r in col.runs):
            baseline = "finetune"
    rows, sweeps = aggregate(col, baseline, info.get("labels"), confidence)
    from ..analysis.depth import read_monitor
    monitors = {r.path: read_monitor(r.path) for r in col.runs}  # each depth.jsonl parsed once
    pngs: dict[tuple, list[str]] = defaultdict(list)
    if plots and col.runs:
        cells: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
        for r in col.runs:
            cells[r.cell][r.label].append(r)
        for cell, by_label in cells.items():
            title = f"{cell[0]} / {cell[1]} / train fraction {cell[2]:g}"
            labels = [r["method"] for r in rows if (r["dataset"], r["model"], r["train_fraction"]) == cell
                      and r["kind"] == "run"]
            name = f"curves_{cell_slug(cell)}.png"
            plot_curves(by_label, labels, root / name, title)
            pngs[cell].append(name)
            name = f"accuracy_{cell_slug(cell)}.png"
            plot_accuracy([r for r in rows if (r["dataset"], r["model"], r["train_fraction"]) == cell],
                          root / name, title, baseline, confidence)
            pngs[cell].append(name)
            profiles = {}
            for label in labels:
                seeds = [p for p in (_depth_profile(r, depth, monitors[r.path]) for r in by_label[label]) if p]
                if seeds:
                    profiles[label] = seeds
            if profiles:
                name = f"depth_{cell_slug(cell)}.png"
                plot_depth(profiles, root / name, title + ": relative weight change by depth")
                pngs[cell].append(name)
    drows = depth_rows(col, baseline, info.get("labels"), confidence, monitors)
    md = render_markdown(root, col, rows, sweeps, baseline, info, pngs, confidence, drows)
    atomic_write_text(root / "results.md", md + "\n")
    atomic_write_text(root / "results.csv", to_csv(rows))
    if drows:
        atomic_write_text(root / "depth.csv", to_csv(drows, DEPTH_COLUMNS))
    if page is not None:
        update_page(page, page_block(root, Path(page), col, rows, sweeps, baseline, pngs, confidence, drows))
    return {"rows": rows, "sweeps": sweeps, "baseline": baseline, "markdown": root / "results.md",
            "tensorboard": tensorboard_command(root) if has_events(root) else None,
            "csv": root / "results.csv", "depth_rows": drows, "plots": [root / p for ps in pngs.values() for p in ps],
            "unfinished": col.unfinished, "failed": col.failed}
