"""Plots of the backprop-in-depth numbers (:mod:`.depth`, :mod:`.runs`): by-layer profiles, the
``DepthMonitor`` record of one run, gradient ratios of several runs (matplotlib, Agg canvas).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .depth import grad_window_means


LAYER_AXIS = "layer (conv / linear weights, input side -> head; x = head)"


def finish_depth_axes(
    fig: Any, ax: Any, path: str | Path, title: str, xlabel: str, ylabel: str = "‖W(T) − W(0)‖ / ‖W(0)‖"
) -> None:
    """The common look of every by-layer plot (log y, labels, legend), then save."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 8:  # many runs: the legend beside the axes, not over the curves
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def plot_profiles(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Overlay :func:`run_depth` results (one line per run); the head's layers are marked with x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=90)
    for res in results:
        _plot_by_layer(
            ax,
            [max(layer["rel_change"], 1e-12) for layer in res["layers"]],
            [layer["head"] for layer in res["layers"]],
            res["label"],
        )
    finish_depth_axes(fig, ax, path, title or "relative weight change by depth", LAYER_AXIS)
    plt.close(fig)


def plot_monitor(mon: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Two panels: r_l after each epoch; mean gradient norm per layer before / after each re-init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4), dpi=90)
    cmap = matplotlib.colormaps["viridis"]
    rows = mon["weights"]
    for j, rec in enumerate(rows):
        a.plot(
            [max(v, 1e-12) for v in rec["rel_change"]],
            color=cmap(j / max(1, len(rows) - 1)),
            lw=1,
            label=f"epoch {rec['epoch']}" if j in (0, len(rows) - 1) else None,
        )
    a.set_yscale("log")
    a.set_title("relative weight change after each epoch", fontsize=9)
    a.set_xlabel("layer (input side -> head)", fontsize=8)
    for r, sides in grad_window_means(mon).items():
        for side, ls in (("before", "--"), ("after", "-")):
            if side in sides:
                mean, steps = sides[side]
                b.plot([max(v, 1e-12) for v in mean], ls=ls, lw=1.1, label=f"epoch {r}: {steps} steps {side}")
    b.set_yscale("log")
    b.set_title("gradient norm per layer around each re-init epoch", fontsize=9)
    b.set_xlabel("layer (input side -> head)", fontsize=8)
    for ax in (a, b):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gradient_ratios(
    ratios: dict[str, list[float | None]], head: Sequence[bool], path: str | Path, title: str = ""
) -> None:
    """One line per run: :func:`gradient_ratios` by layer (after / before the re-init; 1 = unchanged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=90)
    for label, ys in ratios.items():
        _plot_by_layer(ax, ys, head, label)
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    finish_depth_axes(
        fig,
        ax,
        path,
        title or "gradient norm just after / just before the re-init epoch boundary",
        LAYER_AXIS,
        ylabel="grad norm after / before",
    )
    plt.close(fig)


def _plot_by_layer(ax: Any, ys: Sequence[float | None], head: Sequence[bool], label: str) -> None:
    """One line by layer index (None values skipped), the head's layers marked with x."""
    xs = [i for i, v in enumerate(ys) if v is not None]
    (line,) = ax.plot(xs, [ys[i] for i in xs], lw=1.2, label=label)
    heads = [i for i in xs if i < len(head) and head[i]]
    ax.plot(heads, [ys[i] for i in heads], "x", color=line.get_color())
