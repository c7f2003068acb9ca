"""Cyclic learning rate: cosine annealing with warm restarts for all layers (``--trick cyclic-lr``).

Paper: Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
arXiv 1608.03983. Within a cycle ``[s, t)`` the LR multiplier at epoch ``e`` is
``m + (1 - m) * (1 + cos(pi * (e - s) / (t - s))) / 2`` (eq. 5, ``m = eta_min / eta_max``), restarting at
1 at every cycle start. "Under the same settings" as RIFLE (REFERENCE.md §4): with ``--method rifle`` the
restarts fall on RIFLE's period boundaries. Defaults and decisions: docs/methods.md "cyclic-lr".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..core.schedule import raw_points
from .base import Method, RunContext, register


DEFAULT_CYCLES = 2  # without RIFLE: one warm restart, at the middle of the run


def cycle_starts(epochs: int, cycles: int) -> list[int]:
    """Start epochs of ``cycles`` equal cycles: ``[0, floor(i * E / cycles) for i = 1..cycles-1]``."""
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f"cyclic-lr cycles must be an int >= 1, got {cycles!r}")
    if cycles > epochs:
        raise ValueError(
            f"cyclic-lr: {cycles} cycles do not fit in {epochs} epoch(s); "
            f"use --cyclic-lr-cycles <= {epochs} (with --method rifle: or fewer --reinits) "
            f"or train longer"
        )
    return [0, *raw_points(epochs, cycles - 1)]


def sgdr_factor(epoch: int, epochs: int, cycles: int, min_factor: float = 0.0) -> float:
    """LR multiplier at ``epoch``: a cosine from 1 to ``min_factor`` within each cycle."""
    starts = cycle_starts(epochs, cycles)
    e = min(max(int(epoch), 0), epochs)  # epoch == E (after the last step) ends the last cycle
    s = max(x for x in starts if x <= e)
    t = next((x for x in starts if x > s), epochs)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * (e - s) / (t - s)))


@register("cyclic-lr")
@dataclass
class CyclicLR(Method):
    """SGDR cosine with warm restarts for all layers (with RIFLE: K+1 cycles on its period boundaries)."""

    cycles: int | None = None  # None: K + 1 with --method rifle, else DEFAULT_CYCLES (at most E)
    min_factor: float = 0.0  # eta_min / eta_max

    kind = "trick"
    option_help = {
        "cycles": "number of cosine cycles (default: with --method rifle, reinits + 1 on RIFLE's "
        f"periods; otherwise {DEFAULT_CYCLES}, one restart at the middle)",
        "min_factor": "lowest LR as a fraction of the base LR (eta_min / eta_max)",
    }

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_factor < 1.0:
            raise ValueError(f"cyclic-lr min_factor must be in [0, 1), got {self.min_factor}")
        if self.cycles is not None and (
            isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1
        ):
            raise ValueError(f"cyclic-lr cycles must be an int >= 1 or None, got {self.cycles!r}")

    def resolve_cycles(self, ctx: RunContext) -> int:
        if ctx.config.get("method") == "rifle" and ctx.config.get("reinit_trigger") == "converged":
            raise ValueError(
                "--trick cyclic-lr cannot be combined with --reinit-trigger converged: its warm "
                "restarts fall on RIFLE's fixed schedule points, while the converged trigger "
                "re-initialises only once the head has converged, possibly never; drop one "
                "(--reinit-trigger schedule keeps the restarts on the re-inits)"
            )
        if self.cycles is not None:
            return self.cycles
        if ctx.config.get("method") != "rifle":  # fine-tuning has no K: reinits is RIFLE's option
            return min(DEFAULT_CYCLES, ctx.epochs)
        k = ctx.config.get("reinits")
        if k is None:
            raise ValueError("cyclic-lr: set cycles, or run with a config that has reinits (K + 1 cycles)")
        return int(k) + 1

    def lr_lambda(self, ctx: RunContext) -> Callable[[int], float]:
        epochs, cycles, m = ctx.epochs, self.resolve_cycles(ctx), self.min_factor
        starts = cycle_starts(epochs, cycles)  # validates before training starts
        ctx.log(f"cyclic-lr: {cycles} cosine cycle(s), restarts at epoch(s) {starts[1:]}, min factor {m}")
        return lambda e: sgdr_factor(e, epochs, cycles, m)
