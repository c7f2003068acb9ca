"""The PNGs of ``rifle report`` (matplotlib, Agg backend): per cell, the mean curves over seeds, the test
accuracies with their t intervals, and the relative weight change by layer depth."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .aggregate import finite_number
from .collect import Collected, RunRecord

PLOT_DPI = 90


def cell_slug(cell: tuple) -> str:
    from .grid import safe_name

    return safe_name(f"{cell[0]}_{cell[1]}_frac{cell[2]:g}")


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _mean_curves(runs: list[RunRecord], key: str) -> tuple[list[int], list[float]]:
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for m in r.metrics():
            if finite_number(m.get(key)) is not None:
                per_epoch[int(m["epoch"])].append(float(m[key]))
    # only the epochs every run measured (a test split evaluated where needed, --eval-test needed, is
    # missing at some epochs: a mean over fewer seeds would not be the same curve)
    epochs = sorted(e for e, ys in per_epoch.items() if len(ys) == len(runs))
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
            # epochs with gaps between them (the test split under --eval-test needed): points, not a line
            gaps = ep != list(range(ep[0], ep[-1] + 1))
            style = {"ls": "none", "marker": "o", "ms": 4} if gaps else {}
            ax.plot(ep, ys, color=color, lw=1.3, label=label, **style)
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


def plot_accuracy(
    cell_rows: list[dict[str, Any]], path: Path, title: str, baseline: str | None, confidence: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(cell_rows))
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(rows)), dpi=PLOT_DPI)
    ys = list(range(len(rows)))
    for off, key, marker, name in (
        (0.12, "final_test", "o", "final test"),
        (-0.12, "bestval_test", "s", "test @ best val"),
    ):
        m = [100 * r[f"{key}_mean"] for r in rows]
        lo = [
            100 * (r[f"{key}_mean"] - r[f"{key}_ci_low"]) if math.isfinite(r[f"{key}_ci_low"]) else 0
            for r in rows
        ]
        hi = [
            100 * (r[f"{key}_ci_high"] - r[f"{key}_mean"]) if math.isfinite(r[f"{key}_ci_high"]) else 0
            for r in rows
        ]
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

    finish_depth_axes(
        fig, ax, path, title, "layer (conv / linear weights in forward order; the head is last)"
    )
    plt.close(fig)


def _depth_profile(run: RunRecord, compute: bool, mon: dict[str, Any] | None) -> list[float] | None:
    from ..analysis.runs import load_profile, run_depth

    prof = load_profile(run.path, mon)
    if prof is None and compute:
        prof = [layer["rel_change"] for layer in run_depth(run.path)["layers"]]
    return prof


def write_plots(
    root: Path,
    col: Collected,
    rows: list[dict[str, Any]],
    baseline: str | None,
    confidence: float,
    depth: bool,
    monitors: dict[Path, Any],
) -> dict[tuple, list[str]]:
    """Per cell: ``curves_<cell>.png``, ``accuracy_<cell>.png`` and, when runs hold a depth profile (or
    ``depth``: compute it), ``depth_<cell>.png`` into ``root``; returns ``{cell: [file names]}``."""
    pngs: dict[tuple, list[str]] = defaultdict(list)
    cells: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in col.runs:
        cells[r.cell][r.label].append(r)
    for cell, by_label in cells.items():
        title = f"{cell[0]} / {cell[1]} / train fraction {cell[2]:g}"
        labels = [
            r["method"]
            for r in rows
            if (r["dataset"], r["model"], r["train_fraction"]) == cell and r["kind"] == "run"
        ]
        name = f"curves_{cell_slug(cell)}.png"
        plot_curves(by_label, labels, root / name, title)
        pngs[cell].append(name)
        name = f"accuracy_{cell_slug(cell)}.png"
        plot_accuracy(
            [r for r in rows if (r["dataset"], r["model"], r["train_fraction"]) == cell],
            root / name,
            title,
            baseline,
            confidence,
        )
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
    return pngs
