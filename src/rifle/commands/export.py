"""``rifle export``: a run's model as ONNX or TorchScript, with its preprocessing as JSON beside it."""

from __future__ import annotations

import argparse
import sys

from . import add_threads, apply_threads

NAME = "export"
HELP = "export a fine-tuned run to ONNX or TorchScript (+ preprocessing JSON)"
EXAMPLE = "rifle export runs/mine --format onnx --out model.onnx   # writes model.onnx + model.onnx.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `rifle train --out`")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default onnx")
    p.add_argument(
        "--out",
        default=None,
        help="model file (default RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt); "
        "the preprocessing JSON is written beside it as <file name>.json (model.onnx.json)",
    )
    p.add_argument(
        "--onnx-exporter",
        choices=("auto", "dynamo", "legacy"),
        default="auto",
        help="auto: torch.export-based (dynamo), falling back to the legacy exporter",
    )
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip re-running the exported model and comparing its logits with PyTorch's",
    )
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from ..export import ExportError, export

    try:
        res = export(args.run_dir, args.format, args.out, check=args.check, exporter=args.onnx_exporter)
    except ExportError as e:
        print(f"rifle export: error: {e}", file=sys.stderr)
        return 1
    c = res.check
    check = (
        f"; checked with {res.checked_with}: max |logit diff| {c['max_abs_diff']:.2e} (relative "
        f"{c['max_rel_diff']:.1e}, tolerance {c['rtol']:g}), top-1 agreement {c['top1_agreement']:.0%}"
        if c is not None and res.checked_with
        else ("; not checked (install onnxruntime to check)" if args.check else "")
    )
    print(f"wrote {res.path} ({args.format}, {res.exporter}) and {res.sidecar}{check}")
    return 0
