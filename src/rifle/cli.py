"""``rifle`` command line: parsing only; each sub-command lives in :mod:`rifle.commands`."""

from __future__ import annotations

import argparse
import importlib
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import NoReturn

from .commands import COMMANDS


def _modules():
    return [importlib.import_module(f".commands.{name}", __package__) for name in COMMANDS]


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the flag, not the 40-line usage of ``rifle train`` first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_ENVIRONMENT = """

environment:
  RIFLE_MALLOC=default  keep glibc's malloc settings (default: tuned, large buffers kept
                        in the process: fewer page faults, the same numbers)"""


def build_parser() -> argparse.ArgumentParser:
    mods = _modules()
    parser = _Parser(
        prog="rifle",
        description="Fine-tuning with RIFLE (re-initialise the FC head) and its rivals.",
        epilog="examples:\n  " + "\n  ".join(m.EXAMPLE for m in mods) + _ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"rifle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for m in mods:
        p = sub.add_parser(
            m.NAME,
            help=m.HELP,
            description=m.HELP,
            epilog=f"example:\n  {m.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        m.add_arguments(p)
        p.set_defaults(_run=m.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .errors import USER_ERRORS
    from .train.allocator import tune_malloc
    from .train.checkpoint import Terminated

    warnings.simplefilter("default", UserWarning)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    handler = args._run
    del args._run
    previous = _on_sigterm_raise()
    try:
        tune_malloc()  # fewer page faults, the same numbers (docs/performance.md, "The allocator")
        return handler(args)
    except USER_ERRORS as e:
        print(f"rifle {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(_interrupted(e, args), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    from .train.checkpoint import Terminated

    raise Terminated


def _on_sigterm_raise():
    """SIGTERM (Slurm, Kubernetes) raises ``Terminated``, handled like Ctrl-C; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:  # e.g. nohup-like launchers that ignore it on purpose
        return None
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous


def _interrupted(e: KeyboardInterrupt, args: argparse.Namespace) -> str:
    """What an interrupted command tells the user: the signal, what is kept and how to continue."""
    from .train.checkpoint import WEIGHTS, Terminated, read_metadata

    what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
    run_dir = getattr(e, "rifle_run_dir", None) or (
        getattr(args, "out", None) if args.command == "train" else None
    )
    if run_dir is None:
        return f"\nrifle {args.command}: {what}"
    try:
        epoch = read_metadata(Path(run_dir) / WEIGHTS).get("epoch")
    except Exception:  # noqa: BLE001 - no checkpoint (yet) or unreadable: say so below
        epoch = None
    kept = (
        f"the checkpoint of epoch {epoch} in {run_dir} is kept"
        if epoch is not None
        else f"no epoch had finished, so {run_dir} holds no checkpoint yet"
    )
    if args.command != "train":
        return f"\nrifle {args.command}: {what}; {kept}"
    return (
        f"\nrifle {args.command}: {what}; {kept}. Continue with:\n"
        f"  rifle train --out {shlex.quote(str(run_dir))} --resume"
    )


if __name__ == "__main__":
    raise SystemExit(main())
