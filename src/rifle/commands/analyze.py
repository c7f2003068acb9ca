"""``rifle analyze``: per-layer weight change (backprop in depth) and Grad-CAM for finished runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_threads, apply_threads

NAME = "analyze"
HELP = "per-layer weight change from the pretrained weights, by depth; Grad-CAM; compare runs"
EXAMPLE = (
    "rifle analyze runs/g/elpv/efficientnet_lite0/frac0.3/finetune/seed0 "
    "runs/g/elpv/efficientnet_lite0/frac0.3/rifle-K2/seed0 --cam 8 --out runs/g/analysis"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folder(s) (rifle train --out / a grid run)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for the comparison of several runs (default: ./analysis); a single run's "
        "outputs go into its own folder",
    )
    p.add_argument("--cam", type=int, default=0, metavar="N", help="Grad-CAM on N test images (0: none)")
    p.add_argument(
        "--cam-layer",
        default=None,
        help="module whose output Grad-CAM uses (default: the forward_features output)",
    )
    p.add_argument(
        "--no-depth",
        action="store_true",
        help="no checkpoint needed: take the weight-change profile from depth.jsonl (runs "
        "trained with --record-depth) instead of the final checkpoint",
    )
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    apply_threads(args)
    from ..analysis.cam import cam_for_runs
    from ..analysis.depth import backbone_thirds, gradient_ratios, read_monitor
    from ..analysis.depth_plots import plot_gradient_ratios, plot_monitor, plot_profiles
    from ..analysis.runs import monitor_depth, run_depth, run_label

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "config.yaml").is_file():
            raise FileNotFoundError(f"{r}: not a run folder (no config.yaml)")
    out = Path(args.out) if args.out else (runs[0] if len(runs) == 1 else Path("analysis"))
    out.mkdir(parents=True, exist_ok=True)
    results, ratios, head = [], {}, []
    for r in runs:
        mon = read_monitor(r)
        if mon and mon["weights"]:
            label = run_label(r)
            plot_monitor(mon, r / "depth_monitor.png", label)
            print(
                f"{r}: depth.jsonl ({len(mon['weights'])} epochs, {len(mon['grad'])} gradient records) "
                f"-> depth_monitor.png"
            )
            ratio = gradient_ratios(mon)
            if ratio is not None:
                ratios[label], head = ratio, mon["header"]["head"]
        if args.no_depth:
            res = monitor_depth(r, mon)
            if res is not None:
                results.append(res)
        else:
            res = run_depth(r)
            results.append(res)
            plot_profiles([res], r / "depth.png", f"{res['label']}: relative weight change by depth")
            thirds = backbone_thirds(
                [x["rel_change"] for x in res["layers"]], [x["head"] for x in res["layers"]]
            )
            print(
                f"{r}: {len(res['layers'])} layers; mean relative change first/middle/last third of the "
                f"backbone {' / '.join(f'{v:.4f}' for v in thirds)}; wrote depth.json, depth.png"
            )
    if len(runs) > 1 and results:
        plot_profiles(results, out / "depth_compare.png", "relative weight change by depth")
        (out / "depth_compare.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out / 'depth_compare.png'} and depth_compare.json")
    if len(runs) > 1 and ratios:
        plot_gradient_ratios(ratios, head, out / "gradients_compare.png")
        print(f"wrote {out / 'gradients_compare.png'} (gradient norm after / before the re-init, by layer)")
    if args.cam:
        res = cam_for_runs(runs, out / "cam.png", n_images=args.cam, layer=args.cam_layer)
        acc = ", ".join(f"{k}: {v:.2f}" for k, v in res["accuracy"].items())
        print(f"wrote {res['png']} (test images {res['indices']}; accuracy on them {acc})")
    return 0
