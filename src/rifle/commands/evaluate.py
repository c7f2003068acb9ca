"""``rifle evaluate``: accuracy, per-class metrics and confusion matrix of a run on labelled data."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from . import add_threads, apply_threads

NAME = "evaluate"
HELP = "evaluate a fine-tuned run on labelled data (accuracy, per-class P/R/F1, confusion matrix)"
EXAMPLE = "rifle evaluate runs/mine --data path/to/heldout --out runs/mine/eval-heldout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `rifle train --out`")
    p.add_argument(
        "--data",
        default=None,
        help="builtin dataset (elpv, digits), an image folder ROOT/{train,val,test}/<class>/*, "
        "or a flat folder ROOT/<class>/* (one split); default: the run's own data",
    )
    p.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="split to evaluate (default test; ignored for a flat folder). With the run's own "
        "data the splits are the run's (same seed, val_fraction, train_fraction)",
    )
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval-<data>-<split>)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's eval_batch_size")
    p.add_argument(
        "--skip-bad-images", action="store_true", help="skip unreadable images instead of stopping"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_threads(p)


def _fmt(v) -> str:
    return "    -" if v is None else f"{v:.3f}"


def report_text(r: dict) -> str:
    lines = [
        f"{r['data_name']} [{r['split']}]: {r['n']} images, accuracy {r['accuracy']:.4f}, "
        f"loss {r['loss']:.4f}"
        if r["loss"] is not None
        else f"{r['n']} images"
    ]
    w = max([5] + [len(c) for c in r["classes"]])
    lines.append(f"{'class':<{w}}  precision  recall     f1  support")
    for c, m in r["per_class"].items():
        lines.append(
            f"{c:<{w}}      {_fmt(m['precision'])}   {_fmt(m['recall'])}  {_fmt(m['f1'])}  {m['support']:7d}"
        )
    mac = r["macro"]
    lines.append(
        f"{'macro':<{w}}      {_fmt(mac['precision'])}   {_fmt(mac['recall'])}  {_fmt(mac['f1'])}  "
        f"{r['n']:7d}"
    )
    cw = max([w] + [len(str(v)) for row in r["confusion_matrix"] for v in row])
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * (w + 2) + " ".join(f"{c[:cw]:>{cw}}" for c in r["classes"]))
    for c, row in zip(r["classes"], r["confusion_matrix"]):
        lines.append(f"{c:<{w}}  " + " ".join(f"{v:>{cw}}" for v in row))
    if r["classes_not_in_data"]:
        lines.append(f"run classes absent from the data: {', '.join(r['classes_not_in_data'])}")
    if r["skipped"]:
        lines.append(f"skipped {len(r['skipped'])} unreadable image(s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from ..evaluation import evaluate, plot_confusion
    from ..inference import load
    from ..train.checkpoint import atomic_write_text
    from ..train.trainer import resolve_device

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    fm = load(args.run_dir, device=resolve_device(args.device))
    r = evaluate(fm, args.data, args.split, batch_size=args.batch_size, skip_bad_images=args.skip_bad_images)
    out = Path(args.out) if args.out else Path(args.run_dir) / f"eval-{r['data_name']}-{r['split']}"
    out.mkdir(parents=True, exist_ok=True)
    preds = r.pop("predictions")
    atomic_write_text(out / "metrics.json", json.dumps(r, indent=2) + "\n")
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        cols = (
            ["index", "path", "true", "predicted", "probability"]
            if preds and "path" in preds[0]
            else ["index", "true", "predicted", "probability"]
        )
        w.writerow(cols)
        for p in preds:
            w.writerow([p[c] if c != "probability" else f"{p[c]:.6f}" for c in cols])
    print(report_text(r))
    try:
        plot_confusion(
            r["confusion_matrix"],
            r["classes"],
            out / "confusion_matrix.png",
            title=f"{r['data_name']} [{r['split']}]  acc {r['accuracy']:.4f}",
        )
        png = ", confusion_matrix.png"
    except ImportError:
        import warnings

        warnings.warn(
            "matplotlib is not installed: confusion_matrix.png not written (pip install 'rifle[report]')",
            stacklevel=1,
        )
        png = ""
    print(f"saved metrics.json, predictions.csv{png} in {out}")
    return 0
