"""One run end to end: config -> data, model, methods, trainer -> ``summary.json``.

Used by ``rifle train``, ``rifle demo`` and (later) the grid runner, so every entry point produces the
same outputs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .config import TrainConfig
from .core.seeding import derive_seed
from .data import DataBundle, build_data
from .methods import create
from .models import create_model, model_preprocessing
from .train import RunDir, Trainer, summarize
from .train.outputs import git_revision, versions
from .train.trainer import resolve_device


def load_data(cfg: TrainConfig) -> DataBundle:
    return build_data(cfg.data, cfg.image_size, seed=cfg.seed, val_fraction=cfg.val_fraction,
                      train_fraction=cfg.train_fraction, skip_bad_images=cfg.skip_bad_images)


def build_methods(cfg: TrainConfig) -> list:
    if cfg.method not in ("finetune", "rifle"):
        raise ValueError(f"--method={cfg.method!r}: choose finetune or rifle")
    return [create(cfg.method, **cfg.method_options())]


def run_train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
              data: DataBundle | None = None, log: Callable[[str], None] = print,
              progress: bool | None = None) -> dict[str, Any]:
    """Train one run into ``cfg.out``; returns the summary (also written to ``summary.json``)."""
    t0 = time.perf_counter()
    run_dir = RunDir(cfg.out)
    config = cfg.to_dict()
    has_checkpoint = run_dir.prepare(config, resume=resume, overwrite=overwrite)
    if resume and has_checkpoint:
        done = run_dir.read_summary()
        if done and done.get("complete"):
            log(f"{run_dir.path}: run already complete; nothing to do")
            return done
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg)
    # the new head's random init is a pure function of the seed: paired runs start identically
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    model = create_model(cfg.model, data.num_classes, pretrained=cfg.pretrained)
    methods = build_methods(cfg)
    meta = {"model": cfg.model, "num_classes": data.num_classes, "classes": data.classes}
    trainer = Trainer(model, data, methods, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                      momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                      lr_schedule=cfg.lr_schedule, image_size=cfg.image_size, seed=cfg.seed,
                      preprocessing=model_preprocessing(model), run_dir=run_dir, device=device,
                      channels_last=cfg.channels_last, eval_batch_size=cfg.eval_batch_size,
                      head=cfg.head, checkpoint_meta=meta, log=log, progress=progress)
    log(f"{cfg.method} | {cfg.model} on {cfg.data}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test images, {data.num_classes} classes, {cfg.epochs} epochs x "
        f"{trainer.steps_per_epoch} steps, {cfg.image_size}px, device {device}")
    history = trainer.fit(resume=has_checkpoint)
    summary = {
        "method": cfg.method, "model": cfg.model, "data": cfg.data, "seed": cfg.seed,
        **summarize(history),
        "reinit_epochs": next((m.reinit_epochs for m in methods if hasattr(m, "reinit_epochs")), []),
        "methods": {m.name: m.config() for m in methods},
        "classes": data.classes, "data_info": data.info, "head": trainer.head_names,
        "preprocessing": {**model_preprocessing(model), "image_size": cfg.image_size,
                          "resize": round(cfg.image_size * 8 / 7)},
        "wall_seconds": time.perf_counter() - t0, "versions": versions(), "git": git_revision(),
        "complete": len(history) == cfg.epochs,
    }
    run_dir.write_summary(summary)
    return summary
