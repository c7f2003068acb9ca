"""Sub-commands of the ``rifle`` CLI, one module each.

A command module defines ``NAME``, ``HELP``, ``EXAMPLE``, ``add_arguments(parser)`` and
``run(args) -> int``; add its module name to :data:`COMMANDS`. Commands only parse and delegate.
"""
COMMANDS = ["train", "demo", "bench", "report", "analyze", "predict", "evaluate", "export"]
