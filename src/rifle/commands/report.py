"""``rifle report``: aggregate a grid folder into results.md, results.csv and plots."""

from __future__ import annotations

import argparse

from . import add_threads, apply_threads

NAME = "report"
HELP = "summarise a grid folder: results.md, results.csv, plots (selection on validation only)"
EXAMPLE = "rifle report docs/results/elpv --page docs/results/elpv.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="grid folder written by rifle bench (or any folder of runs)")
    p.add_argument(
        "--baseline",
        default=None,
        help="method label to compare against (default: the grid's baseline, i.e. plain finetune)",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument(
        "--depth",
        action="store_true",
        help="compute the per-layer weight-change profile (rifle analyze) for runs lacking one",
    )
    p.add_argument(
        "--page",
        default=None,
        metavar="PAGE.md",
        help="also write the tables and plots into this Markdown page, between its markers "
        "'<!-- BEGIN rifle report ... -->' and '<!-- END rifle report -->' (the text around "
        "them is kept; a missing page is created)",
    )
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from ..experiments.report import write_report

    res = write_report(
        args.dir,
        baseline=args.baseline,
        confidence=args.confidence,
        plots=not args.no_plots,
        depth=args.depth,
        page=args.page,
    )
    n = sum(1 for r in res["rows"] if r["kind"] == "run")
    base = (
        f"baseline {res['baseline']}"
        if res["baseline"] is not None
        else "one method: nothing to compare"
        if n <= 1
        else "no baseline: no run labelled finetune, choose one with --baseline LABEL"
    )
    print(
        f"{n} method rows ({base}); wrote {res['markdown']}, {res['csv']}"
        + (f" and {len(res['plots'])} plots" if res["plots"] else "")
        + (
            f"; {len(res['unfinished'])} unfinished and {len(res['failed'])} failed runs not counted"
            if res["unfinished"] or res["failed"]
            else ""
        )
        + (f"; updated {args.page}" if args.page else "")
    )
    for d in res.get("decisions") or []:  # the decision section's plain words, also on the terminal
        print(
            f"{d['dataset']} / {d['model']} / train fraction {d['train_fraction']:g}: {d['method']} vs "
            f"{res['baseline']}: {d['conclusion']}"
        )
        for w in d.get("warnings") or []:
            print(f"  weak: {w}")
    if res.get("tensorboard"):
        print(f"curves of every run in TensorBoard: {res['tensorboard']}")
    if not res["complete"]:
        import sys

        print(
            f"rifle report: no run in {args.dir} is complete ({len(res['failed'])} failed, "
            f"{len(res['unfinished'])} unfinished): nothing to compare",
            file=sys.stderr,
        )
        return 1
    return 0
