"""A run's parts from its :class:`~rifle.config.TrainConfig`: data, methods, and the model as the run
starts (pretrained backbone, seeded first head).

Shared by :func:`rifle.run.run_train` and the analysis of finished runs (:mod:`rifle.analysis.runs`),
so the model an analysis rebuilds is the one training started from.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .core.seeding import derive_seed
from .data import DataBundle, build_data
from .methods import Method, create, registry
from .models import create_model


def load_data(cfg: TrainConfig) -> DataBundle:
    return build_data(
        cfg.data,
        cfg.image_size,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        train_fraction=cfg.train_fraction,
        train_per_class=cfg.train_per_class,
        skip_bad_images=cfg.skip_bad_images,
        label_noise=cfg.label_noise,
        cache_dir=cfg.cache_dir,
    )


def build_methods(cfg: TrainConfig) -> list[Method]:
    """The run's plug-ins: the method (finetune / rifle / lp-ft), the regulariser, then the tricks."""
    reg = registry()
    wanted = [
        (cfg.method, "method", cfg.method_options()),
        (cfg.reg, "reg", None),
        *((t, "trick", None) for t in cfg.trick),
        *([("label-smoothing", "trick", {"eps": cfg.label_smoothing})] if cfg.label_smoothing else []),
    ]
    names = [n for n, _, _ in wanted]
    for name in cfg.options:
        if name not in names:
            raise ValueError(
                f"options for {name!r} were given but {name!r} is not selected "
                f"(use --method {name}, --reg {name} or --trick {name})"
            )
    methods = []
    for name, kind, opts in wanted:
        flag = {"method": "--method", "reg": "--reg", "trick": "--trick"}[kind]
        if name not in reg:
            same_kind = {n.lower(): n for n, c in reg.items() if c.kind == kind}  # RIFLE -> rifle too
            close = [same_kind[n] for n in difflib.get_close_matches(name.lower(), list(same_kind), n=3)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            choices = ", ".join(sorted(n for n, c in reg.items() if c.kind == kind))
            raise ValueError(f"{flag} {name!r}: unknown{hint}; choose from {choices}")
        if reg[name].kind != kind:
            raise ValueError(f"{flag} {name!r}: {name} is a {reg[name].kind}, use --{reg[name].kind} {name}")
        methods.append(create(name, **(opts if opts is not None else cfg.options.get(name, {}))))
    return methods


def model_kwargs(methods: list[Method]) -> dict[str, Any]:
    """Merge what methods need at model construction (e.g. drop_path_rate); conflicts are errors."""
    out: dict[str, Any] = {}
    for m in methods:
        for k, v in m.model_kwargs().items():
            if k in out and out[k] != v:
                raise ValueError(f"{m.name} sets {k}={v!r} but another method set {k}={out[k]!r}")
            out[k] = v
    return out


def blank_model(cfg: TrainConfig, num_classes: int, methods: list[Method] | None = None) -> nn.Module:
    """The run's model without pretrained weights (random init, global RNG), for a checkpoint to fill."""
    methods = methods if methods is not None else build_methods(cfg)
    return create_model(cfg.model, num_classes, pretrained=False, **model_kwargs(methods))


def initial_model(
    cfg: TrainConfig,
    num_classes: int,
    methods: list[Method] | None = None,
    *,
    log: Callable[[str], None] | None = None,
    read_pretrained_file: bool = True,
) -> nn.Module:
    """The model as the run starts training: the pretrained backbone and the run's first head.

    The new head's random init is a pure function of the seed (paired runs start identically): the
    global RNG is seeded with ``derive_seed(cfg.seed, "model")`` before the model is created; wrap the
    call in :func:`torch.random.fork_rng` to leave the caller's RNG state alone.
    ``read_pretrained_file=False``: a resume whose weights all come from the checkpoint leaves
    ``--pretrained-file`` unread (it may have moved); the backbone is then randomly initialised.
    """
    methods = methods if methods is not None else build_methods(cfg)
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    if cfg.pretrained_file is not None and not read_pretrained_file:
        model: Any = create_model(cfg.model, num_classes, pretrained=False, **model_kwargs(methods))
        model.rifle_pretrained_source = f"file {Path(cfg.pretrained_file).expanduser()}"
        return model
    return create_model(
        cfg.model,
        num_classes,
        pretrained=cfg.pretrained,
        pretrained_file=cfg.pretrained_file,
        log=log,
        **model_kwargs(methods),
    )
