"""Overhead of RIFLE's always-on diagnosis (core/diagnosis.py): training time with / without it.

One process, the two sides alternated, median of ``--repeats``; each side is a full ``rifle train``
run (``run_train``) of RIFLE whose re-init falls inside the run, so both gradient windows and the loss
feed are paid (and the same-batch head-signal capture, whose forward hook is timed too). First, the time
spent inside the diagnosis's own calls (each entry point timed) as a share of the epoch: a direct
measure, unaffected by run-to-run noise. Then, per epoch: the training-loop time (the epochs'
``seconds``), the wall time of
the whole ``Trainer.train_epoch`` calls (re-init, loop, evaluation) and their process CPU time (one
thread: less sensitive than wall time to other processes on a shared machine).

Usage: ``python benchmarks/diagnosis_overhead.py [--repeats 3] [--models tiny_cnn,efficientnet_lite0]
[--trigger]``. ``--trigger``: RIFLE with ``--reinit-trigger converged --reinit-converged-acc 1.0``, the
worst case (no re-init ever fires, so the gradient window is armed in every epoch that may precede one).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rifle.methods.rifle as rifle_method
from rifle.config import TrainConfig
from rifle.core import Rifle
from rifle.core.diagnosis import Diagnosis
from rifle.run import run_train
from rifle.train import Trainer

SETTINGS = {
    "tiny_cnn": dict(image_size=32, train_fraction=0.5, batch_size=32),
    "efficientnet_lite0": dict(image_size=64, train_fraction=0.2, batch_size=32),
}


TIMED = [
    (Rifle, "observe"),
    (Rifle, "record_gradients"),
    (Rifle, "close_diagnosis"),
    (Diagnosis, "begin"),
    (Diagnosis, "end"),
    (Diagnosis, "new_period"),
    (Diagnosis, "arm"),
    (Diagnosis, "set_step"),
    (Diagnosis, "settle"),
    (Diagnosis, "pending_state"),
    (Diagnosis, "state_dict"),
    (Rifle, "settle_trigger"),
    (Diagnosis, "disarm"),
    (Diagnosis, "_on_head_forward"),
]  # the head-signal capture: a forward hook on the head
# (its tensor hook only stores a reference; freezing the batch and both heads' signals run inside
# settle / pending_state / begin / end, timed above)


HEAD_SIGNAL = [
    (Diagnosis, "_on_head_forward"),
    (Diagnosis, "_freeze"),
    (Diagnosis, "_head_begin"),
    (Diagnosis, "_head_end"),
]  # the same-batch head signal's share (nested in the above)


def direct_cost(run):
    """Run ``run()`` with the diagnosis's entry points timed; returns (result, seconds inside them,
    seconds inside the head-signal parts). Nested timed calls count once per group."""
    spent = {"all": 0.0, "head": 0.0, "all_cpu": 0.0, "head_cpu": 0.0}
    depth = {"all": 0, "head": 0}
    originals = [(cls, name, getattr(cls, name)) for cls, name in dict.fromkeys(TIMED + HEAD_SIGNAL)]

    def wrap(f, groups):
        def g(*a, **k):
            outer = [grp for grp in groups if depth[grp] == 0]
            for grp in groups:
                depth[grp] += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return f(*a, **k)
            finally:
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                for grp in groups:
                    depth[grp] -= 1
                for grp in outer:
                    spent[grp] += dt
                    spent[grp + "_cpu"] += dc

        return g

    for cls, name, f in originals:
        groups = (["all"] if (cls, name) in TIMED else []) + (["head"] if (cls, name) in HEAD_SIGNAL else [])
        setattr(cls, name, wrap(f, groups))
    try:
        return run(), spent
    finally:
        for cls, name, f in originals:
            setattr(cls, name, f)


def one_run(
    model: str, diagnose: bool, out: Path, epochs: int, trigger: bool = False
) -> tuple[float, float, float]:
    rifle_method.Rifle = lambda *a, **k: Rifle(*a, **{**k, "diagnose": diagnose})  # noqa: E731
    epoch_times: list[float] = []
    cpu_times: list[float] = []
    original = Trainer.train_epoch

    def timed(self, epoch):
        t0, c0 = time.perf_counter(), time.process_time()
        row = original(self, epoch)
        epoch_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        return row

    Trainer.train_epoch = timed
    try:
        cfg = TrainConfig(
            data="digits",
            model=model,
            method="rifle",
            reinits=1,
            epochs=epochs,
            lr=0.02,
            min_steps_after=0,
            threads=1,
            out=str(out),
            **SETTINGS[model],
            **(dict(reinit_trigger="converged", reinit_converged_acc=1.0) if trigger else {}),
        ).validate()
        summary = run_train(cfg, log=lambda s: None, progress=False)
    finally:
        Trainer.train_epoch = original
        rifle_method.Rifle = Rifle
    assert bool(summary["rifle_diagnosis"]) == (diagnose and not trigger)
    return summary["train_seconds"] / epochs, sum(epoch_times) / epochs, sum(cpu_times) / epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--models", default="tiny_cnn,efficientnet_lite0")
    ap.add_argument("--trigger", action="store_true", help="the converged trigger, never firing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):

            def run_one(d, i, model=model):
                return one_run(model, d, Path(tmp) / f"{model}-{d}-{i}", args.epochs, args.trigger)

            run_one(True, -1)  # warm-up: data cache, first-call costs
            (_, per_epoch, cpu_epoch), spent = direct_cost(lambda run_one=run_one: run_one(True, -2))
            for unit, per, sfx in (
                ("wall", per_epoch, ""),
                ("CPU (less sensitive to load)", cpu_epoch, "_cpu"),
            ):
                inside, head = spent["all" + sfx] / args.epochs, spent["head" + sfx] / args.epochs
                print(
                    f"{model:20s} {unit} time inside the diagnosis's calls: {inside * 1000:.2f} ms per epoch "
                    f"= {100 * inside / per:.3f} % of the epoch ({per:.3f} s); of which the same-batch head "
                    f"signal: {head * 1000:.2f} ms = {100 * head / per:.3f} %"
                )
            if args.repeats < 1:  # --repeats 0: the direct measurement only
                continue
            res = {True: [], False: []}
            for i in range(args.repeats):
                for d in (False, True) if i % 2 == 0 else (True, False):
                    res[d].append(run_one(d, i))
            for k, what in (
                (0, "training loop, wall"),
                (1, "whole epoch (re-init, loop, eval), wall"),
                (2, "whole epoch, CPU time of the process"),
            ):
                on = statistics.median(r[k] for r in res[True])
                off = statistics.median(r[k] for r in res[False])
                print(
                    f"{model:20s} {what:40s} per epoch: without {off:.3f} s, with {on:.3f} s, "
                    f"overhead {100 * (on / off - 1):+.2f} %  (medians of {args.repeats}; runs "
                    f"{[round(r[k], 3) for r in res[False]]} / {[round(r[k], 3) for r in res[True]]})"
                )


if __name__ == "__main__":
    main()
