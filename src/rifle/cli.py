"""``rifle`` command line: parsing only; the work is done in :mod:`rifle.run` and friends."""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields
from typing import Any

from .config import PRESETS, TrainConfig

EXAMPLES = {
    "train": "rifle train --data path/to/folder --method rifle --reinits 3 --preset cpu --out runs/mine",
    "demo": "rifle demo            # offline: EfficientNet-Lite0 on ELPV, fine-tuning vs RIFLE",
}

_HELP = {
    "data": "builtin dataset (elpv, digits) or image folder ROOT with train/<class>/*, test/<class>/*",
    "model": "efficientnet_lite0 (offline builtin), tiny_cnn, any timm name, or torchvision:<name>",
    "pretrained": "load pretrained weights (default: yes)",
    "method": "finetune (standard fine-tuning) or rifle",
    "reinits": "RIFLE: K, the number of head re-initialisations (K+1 equal periods)",
    "reinit_granularity": "RIFLE: schedule over epochs or optimizer steps",
    "guard": "RIFLE: drop re-inits leaving fewer epochs after them (default ceil(E/8))",
    "guard_steps": "RIFLE: the same guard, in optimizer steps",
    "min_steps_after": "RIFLE: warn when a period after a re-init has fewer optimizer steps",
    "reinit_init": "RIFLE: initialiser (default = the module's reset_parameters)",
    "keep_optimizer_state": "RIFLE: keep the head's momentum at a re-init (official code)",
    "head_lr_restart": "RIFLE: restart a cosine LR for the head each period (official option)",
    "head": "dotted name(s) of the classifier head, comma-separated (default: found automatically)",
    "epochs": "training epochs", "batch_size": "training batch size", "lr": "SGD learning rate",
    "momentum": "SGD momentum", "weight_decay": "weight decay on all parameters",
    "lr_schedule": "cosine (per epoch, over the run) or constant",
    "image_size": "crop size S; images are resized to S*8/7 first (paper: 256 -> 224)",
    "seed": "run seed: split, data order, augmentation and re-inits derive from it",
    "val_fraction": "validation fraction carved from train (stratified) when the data has no val/",
    "train_fraction": "use this stratified fraction of the training split",
    "skip_bad_images": "skip unreadable images (and report how many) instead of stopping",
    "device": "auto, cpu, cuda or cuda:N", "channels_last": "channels_last memory format",
    "eval_batch_size": "evaluation batch size", "threads": "torch CPU threads",
    "out": "output folder of the run",
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        if f.name in ("extra", "preset"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _HELP.get(f.name, "")}
        t = str(f.type)
        if t == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif t.startswith("int"):
            kw["type"] = int
        elif t.startswith("float"):
            kw["type"] = float
        if f.name == "method":
            kw["choices"] = ["finetune", "rifle"]
        p.add_argument(flag, dest=f.name, **kw)
    p.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                   help="paper: the official recipe (ResNet-50, 40 epochs, 224 px, kept momentum); "
                        "cpu: finishes on 2 CPU cores (EfficientNet-Lite0, 12 epochs, 112 px)")
    p.add_argument("--config", dest="_config", metavar="FILE.yaml", default=None,
                   help="YAML file of settings (keys as the flags, with _); flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rifle", description="Fine-tuning with RIFLE (re-initialise the FC head) and its rivals.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"rifle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a backbone on a dataset",
                       epilog=f"example:\n  {EXAMPLES['train']}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--quiet", action="store_true", help="no per-epoch lines")

    d = sub.add_parser("demo", help="offline demo: fine-tuning vs RIFLE on ELPV (<= 5 min on 2 cores)",
                       epilog=f"example:\n  {EXAMPLES['demo']}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import resolve
    from .run import run_train
    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "_config", "resume", "overwrite", "quiet")}
    cfg = resolve(flags, config_file=args._config)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    summary = run_train(cfg, resume=args.resume, overwrite=args.overwrite, log=log)
    print(f"done: final test acc {summary['final_test_acc']:.4f}, test acc at best val "
          f"{summary['test_acc_at_best_val'] if summary['test_acc_at_best_val'] is not None else float('nan'):.4f}"
          f" (epoch {summary['best_val_epoch']}); outputs in {cfg.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .errors import USER_ERRORS
    warnings.simplefilter("default", UserWarning)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "demo":
            from .demo import run_demo
            run_demo(out=args.out, seed=args.seed)
            return 0
    except USER_ERRORS as e:
        print(f"rifle {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last completed epoch's checkpoint is kept (use --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
