"""One run end to end: config -> data, model, methods (:mod:`rifle.build`), trainer -> ``summary.json``.

Used by ``rifle train``, ``rifle demo`` and (later) the grid runner, so every entry point produces the
same outputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .build import build_methods, initial_model, load_data
from .config import TrainConfig
from .data import DataBundle, data_fingerprint
from .models import file_sha256, model_preprocessing
from .train import RunDir, Trainer, summarize
from .train.allocator import malloc_setting
from .train.outputs import git_revision, versions
from .train.distributed import broadcast_flag, init_from_env
from .train.trainer import resolve_device


def pretrained_record(path: str | None) -> dict[str, Any] | None:
    """``{"path", "sha256"}`` of ``--pretrained-file`` (``sha256`` None when it is not a file), or None."""
    if path is None:
        return None
    p = os.path.abspath(Path(path).expanduser())
    return {"path": p, "sha256": file_sha256(p) if Path(p).is_file() else None}


def run_train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: DataBundle | None = None,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train one run into ``cfg.out``; returns the summary (also written to ``summary.json``)."""
    t0 = time.perf_counter()
    run_dir = RunDir(cfg.out, log=cfg.log_to)  # metrics.jsonl, and metrics.csv / tb/ as --log-to chooses
    methods = build_methods(cfg)  # validates the method/reg/trick choices before touching the folder
    config = {**cfg.to_dict(), "resolved_methods": {m.name: m.config() for m in methods}}
    device = resolve_device(cfg.device)
    dist = init_from_env(device)  # torchrun: join the process group (no-op when alone)
    if dist.enabled:
        config["world_size"] = dist.world_size
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        if not dist.is_main:
            log = lambda s: None  # noqa: E731 - rank 0 speaks for the run
    has_checkpoint = False
    # what reads the pretrained weights (L2-SP's / DELTA's reference): a resume needs --pretrained-file then
    reference_users = tuple(
        [m.name for m in methods if m.needs_pretrained] + (["--record-depth"] if cfg.record_depth else [])
    )
    if dist.is_main:
        # stat-only record of the data; a resume after the data changed is refused, and so is one whose
        # --pretrained-file is another file (its SHA-256 is recorded)
        has_checkpoint = run_dir.prepare(
            config,
            resume=resume,
            overwrite=overwrite,
            fingerprint=data_fingerprint(cfg.data, cfg.label_noise),
            pretrained=pretrained_record(cfg.pretrained_file),
            pretrained_needed_by=reference_users,
        )
    has_checkpoint = broadcast_flag(has_checkpoint, dist, device)
    if resume and has_checkpoint:
        done = run_dir.read_summary()
        if done and done.get("complete"):
            log(f"{run_dir.path}: run already complete; nothing to do")
            return done
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if data is not None and data.info.get("label_noise", {}).get("rate", 0.0) != cfg.label_noise:
        data = None  # a bundle cached for another --label-noise (the grid's cache key predates it)
    data = data if data is not None else load_data(cfg)
    # the new head's random init is a pure function of the seed: paired runs start identically
    # a resume takes every weight from the checkpoint: a moved --pretrained-file nothing reads is not read
    unread = (
        has_checkpoint
        and cfg.pretrained_file is not None
        and not reference_users
        and not Path(cfg.pretrained_file).expanduser().is_file()
    )
    if unread:
        log(
            f"note: --pretrained-file {cfg.pretrained_file} is not there; not needed to resume (the weights "
            f"come from the checkpoint)"
        )
    model = initial_model(cfg, data.num_classes, methods, log=log, read_pretrained_file=not unread)
    meta = {"model": cfg.model, "num_classes": data.num_classes, "classes": data.classes}
    trainer_methods = list(methods)  # `methods` alone is what the config and summary record
    if cfg.record_depth and dist.is_main:
        from .analysis.monitor import DepthMonitor

        trainer_methods.append(DepthMonitor(cfg.out, window=5))
    trainer = Trainer(
        model,
        data,
        trainer_methods,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        image_size=cfg.image_size,
        seed=cfg.seed,
        opt=cfg.opt,
        opt_eps=cfg.opt_eps,
        opt_betas=cfg.opt_betas,
        layer_decay=cfg.layer_decay,
        preprocessing=model_preprocessing(model),
        run_dir=run_dir,
        device=device,
        channels_last=cfg.channels_last,
        eval_batch_size=cfg.eval_batch_size,
        eval_test=cfg.eval_test,
        head=cfg.head,
        checkpoint_meta=meta,
        amp=cfg.amp,
        config={**config, **({"_given": sorted(cfg.given)} if cfg.given is not None else {})},
        compile=cfg.compile,
        grad_accum=cfg.grad_accum,
        workers=cfg.workers,
        dist=dist,
        log=log,
        progress=progress,
        log_interval=cfg.log_interval,
    )
    label = " + ".join([cfg.method] + ([cfg.reg] if cfg.reg != "l2" else []) + cfg.trick)
    log(
        f"{label} | {cfg.model} on {cfg.data}: {len(data.train)} train / {len(data.val)} val / "
        f"{len(data.test)} test images, {data.num_classes} classes, {cfg.epochs} epochs x "
        f"{trainer.steps_per_epoch} steps, {cfg.image_size}px, device {device}"
        + (f", {dist.world_size} DDP ranks" if dist.enabled else "")
    )
    try:
        history = trainer.fit(resume=has_checkpoint)
    except BaseException:
        run_dir.close()  # flush TensorBoard's events of the epochs trained
        raise
    diagnoses = [m.diagnosis for m in methods if hasattr(m, "diagnosis")]  # RIFLE's (--method rifle) only
    triggers = [t for m in methods if (t := getattr(m, "trigger_report", None))]
    summary = {
        "method": cfg.method,
        "reg": cfg.reg,
        "trick": cfg.trick,
        "model": cfg.model,
        "data": cfg.data,
        "seed": cfg.seed,
        "label_noise": data.info.get("label_noise"),
        **summarize(history),
        "reinit_epochs": next((m.reinit_epochs for m in methods if hasattr(m, "reinit_epochs")), []),
        "methods": {m.name: m.config() for m in methods},
        **({"rifle_diagnosis": diagnoses[-1]} if diagnoses else {}),
        **({"rifle_trigger": triggers[-1]} if triggers else {}),
        "classes": data.classes,
        "data_info": data.info,
        "head": trainer.head_names,
        "pretrained_source": model.rifle_pretrained_source,
        "preprocessing": {
            **model_preprocessing(model),
            "image_size": cfg.image_size,
            "resize": round(cfg.image_size * 8 / 7),
        },
        "wall_seconds": time.perf_counter() - t0,
        "versions": versions(),
        "malloc": malloc_setting(),
        "git": git_revision(),
        "complete": len(history) == cfg.epochs,
    }
    if dist.enabled:
        summary["ddp"] = {
            "world_size": dist.world_size,
            "backend": torch.distributed.get_backend(),
            "replica_checksums": trainer.replica_checksums,
        }
    if dist.is_main:
        run_dir.write_predictions(trainer.predictions())  # before summary.json marks the run complete
        run_dir.write_summary(summary)
    run_dir.close()
    return summary
