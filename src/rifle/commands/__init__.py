"""Sub-commands of the ``rifle`` CLI, one module each.

A command module defines ``NAME``, ``HELP``, ``EXAMPLE``, ``add_arguments(parser)`` and
``run(args) -> int``; add its module name to :data:`COMMANDS`. Commands only parse and delegate.
"""

COMMANDS = ["train", "demo", "bench", "report", "analyze", "predict", "evaluate", "export"]


def add_threads(p) -> None:
    """``--threads N`` (as ``rifle train`` / ``rifle bench`` take it): torch's CPU threads."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (torch.set_num_threads; default: torch's own)",
    )


def apply_threads(args) -> None:
    """Apply ``--threads`` (refused below 1, naming the flag)."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads {n}: must be >= 1")
    import torch

    torch.set_num_threads(n)
