"""``rifle train``: fine-tune a backbone on a dataset (one run)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields
from typing import Any

from ..config import PRESETS, TrainConfig

NAME = "train"
HELP = "fine-tune a backbone on a dataset"
EXAMPLE = "rifle train --data path/to/folder --method rifle --reinits 3 --preset cpu --out runs/mine"

_HELP = {
    "data": "builtin dataset (elpv, digits), a published dataset where its archive extracted, NAME:ROOT "
    "(cub200, stanford_dogs, stanford_cars, fgvc_aircraft, dtd, food101, indoor67, caltech256, flowers102, "
    "oxford_pets; docs/data.md#published-datasets), or image folder ROOT with train/<class>/*, "
    "test/<class>/*",
    "model": "efficientnet_lite0 / lite1 / lite2 (offline builtins, ImageNet weights), tiny_cnn, any timm "
    "name, or torchvision:<name>",
    "pretrained": "load pretrained weights",
    "pretrained_file": "load the backbone's pretrained weights from this file instead of the hub (no "
    "network needed): a safetensors file or a torch state dict (read with "
    "weights_only=True) of the --model architecture; its classifier is not loaded "
    "(docs/models.md#pretrained-weights-from-a-file)",
    "method": "finetune (standard fine-tuning), rifle, or lp-ft (linear probe, then fine-tuning)",
    "reg": "regulariser: l2 (weight decay, default), l2sp, delta, bss",
    "trick": "add a trick (repeatable or comma-separated): dropout, dropconnect, stochastic-depth, "
    "disturblabel, cyclic-lr (label smoothing: --label-smoothing EPS)",
    "reinits": "K, the number of head re-initialisations (K+1 equal periods; K >= 1)",
    "reinit_granularity": "schedule the re-inits over epochs or optimizer steps",
    "guard": "drop re-inits leaving fewer epochs after them",
    "guard_steps": "the same guard, in optimizer steps",
    "min_steps_after": "warn when a period after a re-init has fewer optimizer steps (0 = never)",
    "reinit_init": "the head's initialiser at a re-init: default (the module's reset_parameters(), the "
    "paper's), lecun_normal, kaiming_normal (He), xavier_uniform, normal, norm_matched "
    "(the default draw at the old row norms), shrink_perturb[:LAMBDA,SIGMA] (LAMBDA*old + "
    "SIGMA*default draw; 0.4,0.1); - or _ both work",
    "keep_optimizer_state": "keep the head's momentum at a re-init (official code)",
    "head_lr_restart": "restart a cosine LR for the head each period (official option)",
    "head": "dotted name(s) of the classifier head, comma-separated",
    "reinit_modules": "RIFLE beyond the FC layer: also re-init the last N blocks (last:N) or the "
    "modules whose dotted name matches a regular expression",
    "reinit_trigger": "schedule (the paper's fixed points) or converged (re-init once an "
    "epoch's train accuracy reaches --reinit-converged-acc; docs/rifle.md#trigger)",
    "reinit_converged_acc": "the converged trigger's train-accuracy threshold",
    "diagnose": "measure each re-init (train loss before, head norms, backbone gradient ratio, and the "
    "same-batch head-signal ratio ||E_new||/||E_old||, which decides the verdict when "
    "measured) and print a verdict (docs/rifle.md#when)",
    "diagnosis_window": "optimizer steps measured on each side of a re-init by the diagnosis",
    "epochs": "training epochs",
    "batch_size": "training batch size",
    "lr": "learning rate (the head's and backbone's; --layer-decay scales it per layer)",
    "momentum": "momentum of SGD-type optimizers (ignored by the others)",
    "weight_decay": "weight decay on all parameters",
    "opt": "optimizer: sgd (the paper's: torch.optim.SGD, classical momentum) or any name of "
    "timm.optim.list_optimizers() except adahessian and lookahead_*: adamw, lamb, lion, nesterov "
    "(timm's sgd), ...; bnb* and fused* need CUDA and their packages (docs/guide.md#optimizers)",
    "opt_eps": "epsilon of adaptive optimizers (adam, adamw, lamb, ...)",
    "opt_betas": "betas of Adam-type optimizers (adam, adamw, lamb, lion, ...)",
    "layer_decay": "layer-wise LR decay: layer i of L (timm's group_matcher order, head last) trains at "
    "LAYER_DECAY**(L-1-i) x --lr; timm and built-in models only (e.g. 0.75)",
    "lr_schedule": "cosine (per epoch, over the run; --method lp-ft restarts it for each phase unless "
    "--lp-ft-schedule global) or constant",
    "image_size": "crop size S; images are resized to S*8/7 first (paper: 256 -> 224)",
    "seed": "run seed: split, data order, augmentation and re-inits derive from it",
    "val_fraction": "validation fraction carved from train (stratified) when the data has no val/",
    "train_fraction": "use this stratified fraction of the training split",
    "train_per_class": "keep N training images per class, drawn with a fixed split seed (the same for every "
    "--seed): Food-101-30, Caltech-256-30/60 (docs/data.md#train-per-class)",
    "label_noise": "replace each train/val label (not test), with this probability, by another class drawn "
    "uniformly; drawn from the seed, the same for every method (docs/data.md#label-noise)",
    "label_smoothing": "label smoothing EPS in [0, 1): adds the label-smoothing trick, training loss = "
    "F.cross_entropy(..., label_smoothing=EPS); evaluation unchanged (docs/methods.md)",
    "skip_bad_images": "skip unreadable images (and report how many) instead of stopping",
    "cache_dir": "folder of the decode cache: images decoded once, memory-mapped, shared by the runs of "
    "this machine; 'off' decodes into memory every run (docs/data.md#decode-cache)",
    "device": "auto, cpu, cuda or cuda:N",
    "channels_last": "channels_last memory format",
    "eval_batch_size": "evaluation batch size",
    "eval_test": "needed: evaluate the test split only where a reported number comes from: the last "
    "epoch and, after it, a copy of the model kept from the best-validation epoch (the numbers are the "
    "same), every: at every epoch (test curves)",
    "threads": "torch CPU threads",
    "amp": "mixed precision: none, bf16 or fp16",
    "compile": "torch.compile the model",
    "grad_accum": "gradient accumulation: micro-batches per optimizer step",
    "record_depth": "record per-layer weight change and gradient norms around re-inits (depth.jsonl)",
    "workers": "background threads preparing batches (0 = in-process; helps on GPUs)",
    "log_to": "metric files beside metrics.jsonl (always written), comma-separated: csv (metrics.csv), "
    "tensorboard (events in OUT/tb: tensorboard --logdir OUT); auto = csv, and tensorboard when "
    "installed; jsonl = no other file",
    "log_interval": "when stderr is not a terminal (batch jobs, logs piped to a file): print a progress "
    "line (epoch, step, loss, img/s, ETA) every N optimizer steps and at least every 30 s "
    "(0 = none); a terminal gets progress bars instead",
    "out": "output folder of the run",
}
_SKIP = {"extra", "preset", "options", "trick", "opt_betas"}
# how some defaults read in --help (None and other placeholders)
_SHOWN = {
    "guard": "max(1, ceil(E/8))",
    "head": "found automatically",
    "reinit_modules": "none: the head only",
    "threads": "torch's default",
    "reinit_init": "'default'",
    "opt_betas": "the optimizer's",
    "reinit_converged_acc": "0.97",
    "opt_eps": "the optimizer's",
    "layer_decay": "none: off",
    "pretrained_file": "none: timm's / torchvision's hub weights",
    "log_to": "auto: csv,tensorboard when installed",
    "cache_dir": "$RIFLE_CACHE_DIR, else ~/.cache/rifle",
}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:g}" if isinstance(v, float) else str(v)


def default_text(name: str) -> str:
    """``(default X; preset P: Y)`` for a TrainConfig field (presets listed where they differ)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
    text = _SHOWN.get(name) or ("none" if default is None else _fmt(default))
    by_preset = [
        f"{p}: {_fmt(v[name])}" for p, v in sorted(PRESETS.items()) if name in v and v[name] != default
    ]
    return f"(default {text}" + (f"; preset {', '.join(by_preset)}" if by_preset else "") + ")"


def _type_of(annotation: Any) -> type | None:
    text = str(annotation)
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text == name or text.startswith(name + " |") or text == f"<class '{name}'>":
            return t
    return None


def _add_typed(
    p: argparse._ActionsContainer,
    flag: str,
    dest: str,
    annotation: Any,
    help: str,
    metavar: str | None = None,
) -> None:
    t = _type_of(annotation)
    # SUPPRESS: only flags given explicitly reach the config (defaults <- preset <- file <- flags);
    # the default is shown in the help text instead
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help.replace("%", "%%"), "dest": dest}
    if metavar and t is not bool:
        kw["metavar"] = metavar
    if t is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif t in (int, float):
        kw["type"] = t
    p.add_argument(flag, **kw)


def method_option_flags() -> dict[str, tuple[str, str]]:
    """``{dest: (method, option)}`` for every option of every plug-in (RIFLE's are top-level flags)."""
    from ..config import TOP_LEVEL_OPTIONS
    from ..methods import registry

    out: dict[str, tuple[str, str]] = {}
    for name, cls in sorted(registry().items()):
        if name in TOP_LEVEL_OPTIONS or not dataclasses.is_dataclass(cls):
            continue
        for f in fields(cls):
            out[f"opt::{name}::{f.name}"] = (name, f.name)
    return out


# how some values read in --help (the choices; validation and its one-line errors: config.py)
_METAVAR = {
    "reinit_trigger": "{schedule,converged}",
    "reinit_granularity": "{epoch,step}",
    "amp": "{none,bf16,fp16}",
    "lr_schedule": "{cosine,constant}",
    "eval_test": "{needed,every}",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import RIFLE_ONLY_KEYS

    rifle = p.add_argument_group(
        "RIFLE (--method rifle only)",
        "refused with another method, where they would do nothing (docs/rifle.md)",
    )
    for f in fields(TrainConfig):
        if f.name in _SKIP:
            continue
        _add_typed(
            rifle if f.name in RIFLE_ONLY_KEYS else p,
            "--" + f.name.replace("_", "-"),
            f.name,
            f.type,
            f"{_HELP.get(f.name, '')} {default_text(f.name)}".strip(),
            metavar=_METAVAR.get(f.name),
        )
        if f.name == "opt_eps":  # beside --opt and --opt-eps
            p.add_argument(
                "--opt-betas",
                dest="opt_betas",
                nargs=2,
                type=float,
                metavar=("BETA1", "BETA2"),
                default=argparse.SUPPRESS,
                help=f"{_HELP['opt_betas']} {default_text('opt_betas')}",
            )
    p.add_argument(
        "--trick",
        dest="trick",
        action="append",
        default=argparse.SUPPRESS,
        help=_HELP["trick"] + " (default none)",
    )
    # no argparse choices: a wrong one gets config.py's one-line error with a suggestion, not the usage
    p.add_argument(
        "--preset",
        metavar="{" + ",".join(sorted(PRESETS)) + "}",
        default=argparse.SUPPRESS,
        help="paper: the official script's recipe (ResNet-50, 40 epochs, 224 px, kept momentum, "
        "no validation split; differences: README); cpu: finishes on 2 CPU cores "
        "(EfficientNet-Lite0, 12 epochs, 112 px) (default none)",
    )
    p.add_argument(
        "--config",
        dest="_config",
        metavar="FILE.yaml",
        default=None,
        help="YAML file of settings (keys as the flags, with _; a run's own config.yaml works); "
        "flags override it (default none)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with the settings in its "
        "config.yaml (given settings must match) (default off)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out (default off)")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no per-epoch lines; RIFLE's verdict lines are still printed (default off)",
    )
    from ..methods import registry

    reg = registry()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for dest, (method, option) in method_option_flags().items():
        cls = reg[method]
        if method not in groups:
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            groups[method] = p.add_argument_group(f"{method} options ({cls.kind})", doc)
        field = next(f for f in fields(cls) if f.name == option)
        default = field.default if field.default is not dataclasses.MISSING else None
        text = getattr(cls, "option_help", {}).get(option, "")
        if "(default" not in text:
            text = f"{text} (default {'none' if default is None else _fmt(default)})".strip()
        _add_typed(
            groups[method],
            f"--{method}-{option.replace('_', '-')}",
            dest,
            field.type,
            text,
            metavar=option.upper(),
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: defaults <- preset <- config file <- flags; with ``--resume``, the run's own
    ``config.yaml`` instead of defaults and preset, and given settings that differ are refused."""
    from ..config import ConfigError, load_config_file, resolve, resolve_resume
    from ..train.outputs import CONFIG, RunDir

    skip = ("command", "_config", "resume", "overwrite", "quiet")
    flags: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for k, v in vars(args).items():
        if k in skip:
            continue
        if k.startswith("opt::"):
            _, method, option = k.split("::")
            options.setdefault(method, {})[option] = v
        elif k == "trick":
            flags["trick"] = [t for item in v for t in item.split(",") if t]
        else:
            flags[k] = v
    if options:
        flags["options"] = options
    if not args.resume:
        return resolve(flags, config_file=args._config, cli=True)
    out = (
        flags.get("out")
        or (load_config_file(args._config).get("out") if args._config else None)
        or TrainConfig.out
    )
    run_dir = RunDir(out)
    saved = run_dir.read_config()
    if saved is None:
        from ..config import RESUMABLE_KEYS

        if args._config or set(flags) - RESUMABLE_KEYS:  # a job script's first submission: start it
            return resolve(flags, config_file=args._config, cli=True)
        raise ConfigError(
            f"--resume: nothing to resume in {out} (no {CONFIG}); give the run's settings "
            f"(flags or --config) to start it"
        )
    if (
        flags.get("pretrained_file")
        and saved.get("pretrained_file")
        and run_dir.moved_pretrained_file(flags["pretrained_file"])
    ):
        saved = {**saved, "pretrained_file": flags["pretrained_file"]}  # the same bytes at a new place
    return resolve_resume(
        {**saved, "out": out},
        flags,
        args._config,
        source=str(run_dir / CONFIG),
        strict=run_dir.holds_run(),
        cli=True,
    )


def run(args: argparse.Namespace) -> int:
    from ..run import run_train

    cfg = config_from_args(args)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    from ..train.distributed import DistInfo, shutdown

    import torch.distributed as dist

    failure: BaseException | None = None
    try:
        summary = run_train(cfg, resume=args.resume, overwrite=args.overwrite, log=log)
    except BaseException as e:
        failure = e
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            shutdown(DistInfo(world_size=dist.get_world_size()), failure)
    if summary.get("ddp") and int(__import__("os").environ.get("RANK", "0")) != 0:
        return 0
    if args.quiet:  # the per-re-init verdicts are not per-epoch lines: still shown (docs/rifle.md#when)
        for d in summary.get("rifle_diagnosis") or []:
            print(d["verdict"])
    best = summary.get("test_acc_at_best_val")
    best_text = (
        "n/a (no validation split)" if best is None else f"{best:.4f} (epoch {summary['best_val_epoch']})"
    )
    print(
        f"done: final test acc {summary['final_test_acc']:.4f}, test acc at best val {best_text}; "
        f"outputs in {cfg.out}"
    )
    return 0
