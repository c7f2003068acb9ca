"""``rifle demo``: the offline fine-tuning vs RIFLE comparison that ``make demo`` runs."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = (
    "offline demo: will RIFLE help? fine-tuning vs RIFLE on digits, clean and with 40% label noise "
    "(~4 min on 2 cores)"
)
EXAMPLE = "rifle demo            # offline: EfficientNet-Lite0 on digits, clean and 40% noisy labels"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(out=args.out, seed=args.seed)
    return 0
