"""``rifle demo``: will RIFLE help this run? Fine-tuning vs RIFLE in two regimes, offline.

The same few-shot split of scikit-learn's digits at 64 px (offline EfficientNet-Lite0, ImageNet weights),
once with its labels as they are and once with 40 % of the training and validation labels flipped
(``--label-noise 0.4``; the test labels stay clean). RIFLE's diagnosis prints what each re-init did.
Why this recipe: docs/results/regime.md and docs/results/replication.md.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .build import load_data
from .run import run_train
from .train.checkpoint import atomic_write_text

# the regime study's digits64 cell (benchmarks/regime/digits64.yaml) and the replication study's
# digits64_noise40 cell (benchmarks/replication/digits64_noise40.yaml), RIFLE K=1
DEMO = dict(
    data="digits",
    model="efficientnet_lite0",
    epochs=30,
    batch_size=32,
    lr=0.01,
    train_fraction=0.2,
    reinits=1,
    eval_batch_size=256,
)
CELLS: dict[str, dict[str, Any]] = {
    "64px-clean": dict(image_size=64),
    "64px-noise0.4": dict(image_size=64, label_noise=0.4),
}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _table(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| cell | train loss / acc before the re-init | error signal new/old head (same batch) | "
        "backbone gradient after/before | fine-tuning final test | RIFLE final test | Δ (points) | "
        "at best val: fine-tuning / RIFLE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell, r in results.items():
        ft, rf = r["finetune"], r["rifle"]
        d = (rf.get("rifle_diagnosis") or [{}])[0]
        before = (
            f"{d['train_loss_before']:.2f} / {d['train_acc_before']:.2f}"
            if d.get("train_loss_before") is not None and d.get("train_acc_before") is not None
            else "-"
        )
        ratio = f"x{d['grad_ratio']:.2f}" if d.get("grad_ratio") is not None else "-"
        signal = f"x{d['head_signal_ratio']:.2f}" if d.get("head_signal_ratio") is not None else "-"
        delta = 100 * (rf["final_test_acc"] - ft["final_test_acc"])
        lines.append(
            f"| {cell} | {before} | {signal} | {ratio} | {_pct(ft['final_test_acc'])} | "
            f"{_pct(rf['final_test_acc'])} | {delta:+.2f} | {_pct(ft['test_acc_at_best_val'])} / "
            f"{_pct(rf['test_acc_at_best_val'])} |"
        )
    lines += ["", "Verdicts:"] + [
        f"- {cell}: {d['verdict']}"
        for cell, r in results.items()
        for d in r["rifle"].get("rifle_diagnosis") or []
    ]
    return "\n".join(lines)


def run_demo(
    out: str = "runs/demo",
    seed: int = 0,
    recipe: dict[str, Any] | None = None,
    cells: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, dict]]:
    """Fine-tuning and RIFLE (K=1, same seed: same split, head and data order) in each cell."""
    t0 = time.perf_counter()
    recipe, cells = {**DEMO, **(recipe or {})}, cells or CELLS
    print(
        f"rifle demo: will RIFLE help? offline {recipe['model']} on {recipe['data']} "
        f"(train fraction {recipe['train_fraction']}), {recipe['epochs']} epochs, batch "
        f"{recipe['batch_size']}, lr {recipe['lr']} cosine, seed {seed}; RIFLE K={recipe['reinits']}, "
        f"in {len(cells)} regimes: {', '.join(cells)}",
        flush=True,
    )
    results: dict[str, dict[str, dict]] = {}
    for cell, over in cells.items():
        base = TrainConfig(**{**recipe, **over}, seed=seed, out=str(Path(out) / cell / "finetune")).validate()
        data = load_data(base)
        print(
            f"\n== {cell}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
            f"{base.image_size}px ==",
            flush=True,
        )
        results[cell] = {}
        for method in ("finetune", "rifle"):
            cfg = dataclasses.replace(base, method=method, out=str(Path(out) / cell / method))
            print(f"-- {method}", flush=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[cell][method] = run_train(
                    cfg, overwrite=True, data=data, log=lambda s: print("  " + s, flush=True)
                )
            for w in caught:
                print(f"  note: {w.message}")
    table = _table(results)
    total = time.perf_counter() - t0
    note = (
        "In the 5-seed studies behind this recipe, with clean labels the head had memorised its training "
        "set before the re-init and the re-init deepened backpropagation, yet RIFLE K1 ended within noise "
        "of fine-tuning (+0.13 points final test); with 40 % of the labels flipped the head had not "
        "converged, the re-init did not deepen backpropagation, and RIFLE K1 beat fine-tuning in 5 of 5 "
        "seeds (+8.6 points final test, +4.3 on the noisy validation; label smoothing 0.1 gained +1.3). "
        "The verdict of your own runs says what the re-init did to the error signal, not whether accuracy "
        "will follow: judge accuracy on validation over paired seeds (`rifle bench`, `rifle report`; "
        "docs/rifle.md#when, docs/results/replication.md)."
    )
    text = (
        f"# rifle demo (seed {seed})\n\n{table}\n\n{note}\n\n"
        f"Total wall time: {total:.0f} s. Regenerate with `rifle demo --seed {seed}`.\n"
    )
    atomic_write_text(Path(out) / "comparison.md", text)
    print("\n" + table + "\n\n" + textwrap.fill(note, 110))
    print(f"\ntotal {total:.0f} s; written to {Path(out) / 'comparison.md'}")
    return results
