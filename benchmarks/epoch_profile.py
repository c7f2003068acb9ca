"""Where a run's time goes: set-up, then per epoch the training loop, validation, test, the methods'
epoch-end hooks (the depth monitor of ``--record-depth``), the checkpoint and the rest.

Runs ``rifle train`` in this process on the ELPV grid's recipe (``benchmarks/elpv_grid.yaml``:
EfficientNet-Lite0, 112 px, batch 32, ``--record-depth``) with timers wrapped around the trainer's parts,
and prints a markdown table (issue 23's "profile of one epoch"; docs/performance.md).

Usage: ``python benchmarks/epoch_profile.py [--epochs 3] [--fractions 0.3 1.0] [--threads 2]``. "test" is
the test split's evaluations averaged per epoch (with ``--eval-test needed``, the default, at most two in a
run: the last epoch's and the best-validation epoch's copy, after the last epoch).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import rifle.train.trainer as trainer_mod
from rifle.cli import main as rifle_main

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name_of, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name_of(*args, **kwargs)].append(time.perf_counter() - t0)

    return wrapper


def install() -> None:
    T = trainer_mod.Trainer
    T.evaluate = timed(lambda self, ds: "val" if ds is self.data.val else "test", T.evaluate)
    T.train_epoch = timed(lambda self, epoch: "epoch (train + eval + hooks)", T.train_epoch)
    trainer_mod.save_checkpoint = timed(lambda *a, **k: "checkpoint", trainer_mod.save_checkpoint)
    # --eval-test needed: the best-validation epoch's copy is tested after the last epoch, outside it
    T._test_best_copy = timed(
        lambda self: "test of the best epoch's copy (after the last)", T._test_best_copy
    )
    original_fit = T.fit

    def fit(self, resume: bool = False):
        TIMES["setup (start -> first epoch)"].append(time.perf_counter() - START[0])
        for m in self.methods:
            label = f"on_epoch_end {type(m).__name__}"
            m.on_epoch_end = timed(lambda *a, _label=label: _label, m.on_epoch_end)
        t0 = time.perf_counter()
        out = original_fit(self, resume)
        TIMES["fit"].append(time.perf_counter() - t0)
        return out

    T.fit = fit


START = [0.0]


def profile(fraction: float, epochs: int, threads: int, method: str) -> dict[str, float]:
    TIMES.clear()
    with tempfile.TemporaryDirectory() as d:
        argv = ["train", "--data", "elpv", "--preset", "cpu", "--epochs", str(epochs), "--image-size", "112"]
        argv += ["--train-fraction", str(fraction), "--method", method, "--record-depth", "--threads"]
        argv += [str(threads), "--out", str(Path(d) / "run"), "--log-to", "jsonl"]
        if method == "rifle":
            argv += ["--reinits", "1", "--min-steps-after", "0"]
        START[0] = time.perf_counter()
        assert rifle_main(argv) == 0
        TIMES["whole run"].append(time.perf_counter() - START[0])
    once = ("whole run", "setup (start -> first epoch)", "fit")
    out = {k: sum(v) / (1 if k in once else epochs) for k, v in TIMES.items()}
    hooks = sum(v for k, v in out.items() if k.startswith("on_epoch_end"))
    copy = "test of the best epoch's copy (after the last)"
    in_epochs = out.get("test", 0.0) - out.get(copy, 0.0)  # per epoch; the copy's test is outside them
    out["train loop (derived)"] = out["epoch (train + eval + hooks)"] - out.get("val", 0) - in_epochs - hooks
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", default="finetune")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    install()
    rows = {f: profile(f, args.epochs, args.threads, args.method) for f in args.fractions}
    keys = [k for k in next(iter(rows.values())) if k != "fit"]
    print(
        f"\n{args.method}, ELPV, EfficientNet-Lite0 112 px, batch 32, --record-depth, {args.epochs} epochs, "
        f"{args.threads} threads; seconds (per epoch where a part runs every epoch)\n"
    )
    print("| part | " + " | ".join(f"train fraction {f:g}" for f in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r.get(k, float('nan')):.2f}" for r in rows.values()) + " |")
    for f, r in rows.items():
        epoch = r["epoch (train + eval + hooks)"] + r.get("checkpoint", 0.0)
        ev = r.get("val", 0.0) + r.get("test", 0.0)
        print(
            f"\ntrain fraction {f:g}: evaluation (val + test) is {100 * ev / epoch:.0f}% of an epoch "
            f"({ev:.2f} of {epoch:.2f} s); set-up {r['setup (start -> first epoch)']:.1f} s of a "
            f"{r['whole run']:.1f} s run"
        )


if __name__ == "__main__":
    main()
