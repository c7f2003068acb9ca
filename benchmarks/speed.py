"""Speed benchmarks, as ratios measured in one process (``make bench-speed`` -> docs/performance.md).

Each ratio compares two sides run alternately, median of ``--repeats`` repeats, on the same model,
cached data, batch size, augmentation and memory format:

1. trainer overhead   = minimal hand-written loop time / ``rifle`` trainer time (training only)
2. input pipeline     = compute bound (same loop on one pre-built batch) / end-to-end loop time
3. RIFLE overhead     = RIFLE training time / fine-tuning training time
4. rivals' overhead   = each method's training time / fine-tuning training time (per epoch)
5. evaluation         = eval images/s of the trainer / inference-only bound (no autograd)
6. peak RSS of a run and the size of the in-memory cache

Usage: ``python benchmarks/speed.py [--quick] [--out docs/performance.md]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from rifle.config import TrainConfig
from rifle.core.seeding import derive_seed
from rifle.data import eval_batches, train_batches
from rifle.models import create_model, model_preprocessing
from rifle.build import build_methods, load_data, model_kwargs
from rifle.train import RunDir, Trainer

VARIANTS = [
    ("rifle", dict(method="rifle", reinits=1)),
    ("l2sp", dict(reg="l2sp")),
    ("bss", dict(reg="bss")),
    ("delta", dict(reg="delta")),
    ("dropout", dict(trick=["dropout"])),
    ("dropconnect", dict(trick=["dropconnect"])),
    ("stochastic-depth", dict(trick=["stochastic-depth"])),
    ("disturblabel", dict(trick=["disturblabel"])),
    ("cyclic-lr", dict(trick=["cyclic-lr"])),
]


def trainer_for(cfg: TrainConfig, data, tmp: str) -> Trainer:
    methods = build_methods(cfg)
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    model = create_model(cfg.model, data.num_classes, pretrained=True, **model_kwargs(methods))
    cfg_dict = cfg.to_dict()
    return Trainer(
        model,
        data,
        methods,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        image_size=cfg.image_size,
        seed=cfg.seed,
        preprocessing=model_preprocessing(model),
        run_dir=RunDir(tempfile.mkdtemp(dir=tmp)),
        device=torch.device("cpu"),
        channels_last=cfg.channels_last,
        config=cfg_dict,
        log=lambda s: None,
        progress=False,
    )


def trainer_epoch_seconds(cfg: TrainConfig, data, tmp: str, epoch: int = 0) -> float:
    """Training seconds of one epoch (evaluation excluded), after methods' setup."""
    t = trainer_for(cfg, data, tmp)
    for m in t.methods:
        m.setup(t.model, t.optimizer, t.ctx)
    t.evaluate = lambda ds: {"acc": 0.0, "loss": 0.0, "n": 0}  # time training only
    return t.train_epoch(epoch)["seconds"]


def minimal_loop_seconds(cfg: TrainConfig, data, prebuilt: bool) -> float:
    """The minimal PyTorch loop on the same model/data/augmentation (or one pre-built batch)."""
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    model = create_model(cfg.model, data.num_classes, pretrained=True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    prep = model_preprocessing(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    batches = train_batches(
        data.train,
        cfg.batch_size,
        cfg.image_size,
        prep["mean"],
        prep["std"],
        seed=cfg.seed,
        epoch=0,
        channels_last=cfg.channels_last,
    )
    if prebuilt:
        fixed = list(batches)
        x0, y0 = fixed[0]
        sizes = [len(y) for _, y in fixed]
        batches = ((x0[:n], y0[:n]) for n in sizes)
        # (slices of one batch: no data work at all; the last batch keeps its smaller size)
    t0 = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def eval_ratio(cfg: TrainConfig, data, tmp: str) -> tuple[float, float]:
    t = trainer_for(cfg, data, tmp)
    ds = data.test
    t0 = time.perf_counter()
    t.evaluate(ds)
    ours = len(ds) / (time.perf_counter() - t0)
    prep = model_preprocessing(t.model)
    x, _ = next(
        eval_batches(ds, 256, cfg.image_size, prep["mean"], prep["std"], channels_last=cfg.channels_last)
    )
    t.model.eval()
    n_batches = -(-len(ds) // 256)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(n_batches):
            t.model(x)
        bound = n_batches * len(x) / (time.perf_counter() - t0)
    return ours, bound


def median_ratio(fa, fb, repeats: int) -> tuple[float, float, float]:
    """Run a and b alternately (after one warm-up each); return (median a, median b, median a/b)."""
    fa(), fb()
    a, b = [], []
    for _ in range(repeats):
        a.append(fa())
        b.append(fb())
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/performance.md")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model and data (a smoke test)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.quick:
        cfg = TrainConfig(
            data="digits",
            model="tiny_cnn",
            image_size=16,
            batch_size=32,
            train_fraction=0.2,
            epochs=4,
            min_steps_after=0,
        )
    else:
        cfg = TrainConfig(
            data="elpv",
            model="efficientnet_lite0",
            image_size=112,
            batch_size=32,
            train_fraction=0.2,
            epochs=4,
            min_steps_after=0,
        )
    cfg.validate()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = load_data(cfg)
    # the decoded images the splits index into (a split may be a view of another's: count each once)
    bases = {id(s.base): s.base for s in (data.train, data.val, data.test)}
    cache_mb = sum(b.numel() * b.element_size() for b in bases.values()) / 2**20
    n_train = len(data.train)
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ft = dataclasses.replace(cfg, method="finetune")
        minimal_t, trainer_t, r1 = median_ratio(
            lambda: minimal_loop_seconds(ft, data, False),
            lambda: trainer_epoch_seconds(ft, data, tmp),
            args.repeats,
        )
        rows.append(
            (
                "trainer overhead: minimal loop time / rifle trainer time",
                f"{r1:.3f}",
                "≥ 0.97",
                f"minimal {n_train / minimal_t:.1f} img/s, trainer {n_train / trainer_t:.1f} img/s",
            )
        )
        bound_t, e2e_t, r2 = median_ratio(
            lambda: minimal_loop_seconds(ft, data, True),
            lambda: minimal_loop_seconds(ft, data, False),
            args.repeats,
        )
        rows.append(
            (
                "input pipeline: compute bound time / end-to-end time",
                f"{r2:.3f}",
                "≥ 0.90",
                f"bound {n_train / bound_t:.1f} img/s, end-to-end {n_train / e2e_t:.1f} img/s",
            )
        )
        ours, bound = eval_ratio(ft, data, tmp)
        rows.append(
            (
                "evaluation: trainer eval img/s / inference-only bound",
                f"{ours / bound:.3f}",
                "≥ 0.9",
                f"eval {ours:.1f} img/s, bound {bound:.1f} img/s",
            )
        )
        from rifle.methods import registry

        targets = {"rifle": "≤ 1.01", "l2sp": "≤ 1.05", "bss": "≤ 1.15", "delta": "≤ 1.6"}
        for label, change in VARIANTS:
            name = change.get("reg") or (change.get("trick") or [change.get("method")])[0]
            if name not in registry():
                rows.append(
                    (
                        f"{label} / fine-tuning (per epoch)",
                        "n/a",
                        targets.get(label, "≤ 1.03"),
                        "method not available",
                    )
                )
                continue
            var = dataclasses.replace(cfg, **change)
            # epoch 2 of 4: RIFLE with K=1 re-initialises at this epoch's start
            m_t, f_t, r = median_ratio(
                lambda var=var: trainer_epoch_seconds(var, data, tmp, epoch=2),
                lambda: trainer_epoch_seconds(ft, data, tmp, epoch=2),
                args.repeats,
            )
            rows.append(
                (
                    f"{label} / fine-tuning (per epoch)",
                    f"{r:.3f}",
                    targets.get(label, "≤ 1.03"),
                    f"{n_train / m_t:.1f} vs {n_train / f_t:.1f} img/s",
                )
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    cmd = "make bench-speed" if not args.quick else "python benchmarks/speed.py --quick"
    lines = [
        "# Performance",
        "",
        f"Regenerate: `{cmd}` (writes this file). Machine: {machine}. Model {cfg.model} at "
        f"{cfg.image_size} px, batch {cfg.batch_size}, channels_last={cfg.channels_last}, "
        f"{n_train} training images per epoch ({cfg.data}, train fraction {cfg.train_fraction}). "
        f"Each ratio: the two sides run alternately in one process, median of {args.repeats} "
        f"repeats. Absolute images/s are for context only.",
        "",
        "| measure | ratio | target | absolute |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += [
        "",
        f"Peak RSS of this benchmark process: {rss:.0f} MiB (before loading data: "
        f"{rss0 / 1024:.0f} MiB); decoded uint8 images (memory-mapped from the decode cache): "
        f"{cache_mb:.1f} MiB.",
        "",
        "When `--channels-last` and `--amp` help on this CPU: [performance-options.md]"
        "(performance-options.md).",
        "",
    ]
    text = "\n".join(lines)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.read_text() if out.is_file() else ""
        kept = old[old.find("<!-- BEGIN ") :] if "<!-- BEGIN " in old else ""  # other benchmarks' sections
        out.write_text(text + ("\n" + kept if kept else ""))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
