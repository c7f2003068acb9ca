"""``rifle`` command line: parsing only; each sub-command lives in :mod:`rifle.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .commands import COMMANDS


def _modules():
    return [importlib.import_module(f".commands.{name}", __package__) for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    mods = _modules()
    parser = argparse.ArgumentParser(
        prog="rifle", description="Fine-tuning with RIFLE (re-initialise the FC head) and its rivals.",
        epilog="examples:\n  " + "\n  ".join(m.EXAMPLE for m in mods),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"rifle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for m in mods:
        p = sub.add_parser(m.NAME, help=m.HELP, description=m.HELP, epilog=f"example:\n  {m.EXAMPLE}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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
    warnings.simplefilter("default", UserWarning)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    handler = args._run
    del args._run
    try:
        return handler(args)
    except USER_ERRORS as e:
        print(f"rifle {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last completed epoch's checkpoint is kept (use --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
