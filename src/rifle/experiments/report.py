"""``rifle report DIR``: aggregate a grid folder into ``results.md``, ``results.csv`` and small PNGs.

:func:`write_report` ties together :mod:`.collect` (the runs), :mod:`.aggregate` (the numbers, K of
RIFLE selected on validation; nothing is ever selected on test), :mod:`.markdown` (the text) and
:mod:`.plots`. What it writes and the selection rule: docs/experiments.md, "The report".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .aggregate import (
    DEPTH_COLUMNS,
    REFERENCE_COLUMNS,
    aggregate,
    class_rows,
    decisions,
    depth_rows,
    reference_rows,
    to_csv,
)
from .collect import collect, grid_info
from .markdown import has_events, page_block, render_markdown, tensorboard_command, update_page
from .plots import write_plots
from .stats import BOOTSTRAP_B


def write_report(
    root: str | Path,
    *,
    baseline: str | None = None,
    confidence: float = 0.95,
    plots: bool = True,
    depth: bool = False,
    page: str | Path | None = None,
    bootstrap: int = BOOTSTRAP_B,
) -> dict[str, Any]:
    """Write ``results.md``, ``results.csv`` and the PNGs into ``root``; returns rows and paths.

    ``references.csv`` (and a "Published numbers" section) when the grid has a ``reference:`` block.
    ``page``: also write the tables and plots between the markers of this hand-written Markdown page
    (:func:`update_page`). ``bootstrap``: resamples of the two-level bootstrap (0: none).
    """
    from ..train.checkpoint import atomic_write_text

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    col = collect(root)
    if not col.runs and not col.unfinished and not col.failed:
        raise FileNotFoundError(f"{root}: no runs found (no summary.json below it)")
    info = grid_info(root)
    if baseline is None:
        baseline = info.get("baseline")
        if baseline is None and any(r.label == "finetune" for r in col.runs):
            baseline = "finetune"
    rows, sweeps = aggregate(col, baseline, info.get("labels"), confidence, bootstrap)
    classes = class_rows(col, baseline, info.get("labels"))
    decided = decisions(col, rows, baseline, info.get("seeds"), classes)
    from ..analysis.depth import read_monitor

    monitors = {r.path: read_monitor(r.path) for r in col.runs}  # each depth.jsonl parsed once
    pngs = write_plots(root, col, rows, baseline, confidence, depth, monitors) if plots and col.runs else {}
    drows = depth_rows(col, baseline, info.get("labels"), confidence, monitors)
    refs = reference_rows(info.get("reference"), rows, info.get("dataset_keys"))  # beside ours, never in rows
    md = render_markdown(
        root, col, rows, sweeps, baseline, info, pngs, confidence, drows, classes, decided, references=refs
    )
    atomic_write_text(root / "results.md", md + "\n")
    atomic_write_text(root / "results.csv", to_csv(rows))
    if refs:
        atomic_write_text(root / "references.csv", to_csv(refs, REFERENCE_COLUMNS))
    if drows:
        atomic_write_text(root / "depth.csv", to_csv(drows, DEPTH_COLUMNS))
    if page is not None:
        block = page_block(
            root,
            Path(page),
            col,
            rows,
            sweeps,
            baseline,
            pngs,
            confidence,
            drows,
            classes,
            decided,
            references=refs,
            reference=info.get("reference"),
        )
        update_page(page, block)
    return {
        "rows": rows,
        "sweeps": sweeps,
        "baseline": baseline,
        "markdown": root / "results.md",
        "tensorboard": tensorboard_command(root) if has_events(root) else None,
        "csv": root / "results.csv",
        "references": refs,
        "depth_rows": drows,
        "class_rows": classes,
        "decisions": decided,
        "plots": [root / p for ps in pngs.values() for p in ps],
        "unfinished": col.unfinished,
        "failed": col.failed,
        "complete": len(col.runs),
    }
