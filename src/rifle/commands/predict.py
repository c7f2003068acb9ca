"""``rifle predict``: classify image files and folders with a fine-tuned run."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from . import add_threads, apply_threads

NAME = "predict"
HELP = "classify images (files or folders, recursively) with a fine-tuned run"
EXAMPLE = "rifle predict runs/mine photos/ extra.jpg --top-k 3 --format csv > predictions.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `rifle train --out`")
    p.add_argument(
        "inputs",
        metavar="IMAGE_OR_FOLDER",
        nargs="+",
        help="image files and/or folders (searched recursively for image files)",
    )
    p.add_argument("--top-k", type=int, default=1, help="most probable classes per image (default 1)")
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output on stdout: aligned table (default), csv (path,rank,class,probability) or json",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.epilog = (
        f"example:\n  {EXAMPLE}\n\nexit status: 0 every image was classified; 1 some inputs could "
        "not be read\n(each is named on stderr, the others are still printed); 2 nothing could be "
        "classified\nor a bad argument/run folder."
    )
    add_threads(p)


def _write(rows: list[tuple[str, list[tuple[str, float]]]], fmt: str, out) -> None:
    if fmt == "json":
        json.dump(
            [
                {"path": p, "predictions": [{"class": c, "probability": v} for c, v in preds]}
                for p, preds in rows
            ],
            out,
            indent=2,
        )
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["path", "rank", "class", "probability"])
        for p, preds in rows:
            for rank, (c, v) in enumerate(preds, 1):
                w.writerow([p, rank, c, f"{v:.6f}"])
    else:
        k = max(len(preds) for _, preds in rows)
        names = ["prediction"] if k == 1 else [f"prediction {r}" for r in range(1, k + 1)]
        width = max([len("image")] + [len(p) for p, _ in rows])
        cw = max([len(names[-1])] + [len(c) for _, preds in rows for c, _ in preds])
        head = "   ".join(f"{n:<{cw}}  probability" for n in names)
        out.write(f"{'image':<{width}}  {head}\n")
        for p, preds in rows:
            cells = "   ".join(f"{c:<{cw}}  {v:11.4f}" for c, v in preds)
            out.write(f"{p:<{width}}  {cells}\n")


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from ..inference import find_images, load
    from ..train.trainer import resolve_device

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    fm = load(args.run_dir, device=resolve_device(args.device))
    paths, problems = find_images(args.inputs)
    for item, why in problems:
        print(f"rifle predict: {item}: {why}", file=sys.stderr)
    from ..data.folder import decode_many

    rows: list[tuple[str, list[tuple[str, float]]]] = []
    failed = len(problems)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        decoded = decode_many(chunk, fm.resolution)
        ok = []
        for p, d in zip(chunk, decoded):
            if isinstance(d, Exception):
                failed += 1
                print(f"rifle predict: cannot read {p}: {type(d).__name__}: {d}", file=sys.stderr)
            else:
                ok.append((p, d))
        if ok:
            proba = fm.logits_of_decoded([d for _, d in ok], args.batch_size).softmax(1)
            rows += [(str(p), preds) for (p, _), preds in zip(ok, fm.top_k(proba, args.top_k))]
    if not rows:
        raise ValueError(
            "no image could be classified" + (f" ({failed} input(s) failed, see above)" if failed else "")
        )
    _write(rows, args.format, sys.stdout)
    if failed:
        print(
            f"rifle predict: classified {len(rows)} image(s); {failed} input(s) could not be read",
            file=sys.stderr,
        )
        return 1
    return 0
