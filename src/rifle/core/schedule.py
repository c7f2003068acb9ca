"""When RIFLE re-initialises: pure functions of (length, K, guard).

RIFLE: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349. ``K`` is the *number of
re-initialisations*: a run of ``T`` units (epochs or optimizer steps) is split into ``K + 1`` equal
periods and the head is re-initialised at the **start** of unit ``floor(i * T / (K + 1))``, ``i = 1..K``;
``T`` is never rounded, nothing fires after the last unit, and a re-init leaving fewer than ``guard``
units after it (the unit it fires at included) is dropped with a warning (default ``max(1, ceil(T / 8))``,
5 for T = 40). REFERENCE.md §3.1-3.3.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from types import FrameType


class RifleScheduleWarning(UserWarning):
    """A scheduled re-init was dropped, or a period is too short to re-converge."""


_CORE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = RifleScheduleWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside ``rifle/core`` (the user's line)."""
    frame: FrameType | None = sys._getframe(0)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_CORE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def default_guard(total: int) -> int:
    """``max(1, ceil(total / 8))``: 5 epochs for a 40-epoch run."""
    return max(1, math.ceil(total / 8))


def raw_points(total: int, reinits: int) -> list[int]:
    """Start units of the K re-inits, before the guard: ``floor(i*T/(K+1))`` for i = 1..K.

    Raises ``ValueError`` when the run cannot hold K+1 non-empty periods.
    """
    if isinstance(total, bool) or not isinstance(total, int):
        raise TypeError(f"the run length must be an int, got {total!r}")
    if isinstance(reinits, bool) or not isinstance(reinits, int):
        raise TypeError(f"reinits (K) must be an int, got {reinits!r}")
    if total < 1:
        raise ValueError(f"the run length must be >= 1, got {total}")
    if reinits < 0:
        raise ValueError(f"reinits (K, the number of re-initialisations) must be >= 0, got {reinits}")
    if reinits + 1 > total:
        raise ValueError(
            f"reinits={reinits} needs {reinits + 1} non-empty periods but the run has only {total} "
            f"unit(s); use reinits <= {total - 1} or train longer"
        )
    return [(i * total) // (reinits + 1) for i in range(1, reinits + 1)]


@dataclass(frozen=True)
class Schedule:
    """The resolved schedule: ``points`` are the 0-based units at whose start a re-init happens."""

    total: int
    reinits: int
    guard: int
    points: tuple[int, ...]
    dropped: tuple[int, ...]
    unit: str = "epoch"

    def periods(self) -> list[tuple[int, int]]:
        """``[(start, end), ...]`` half-open periods delimited by the kept points."""
        edges = [0, *self.points, self.total]
        return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def make_schedule(
    total: int, reinits: int, guard: int | None = None, unit: str = "epoch", warn: bool = True
) -> Schedule:
    """Resolve the re-init points for a run of ``total`` units.

    ``guard=None`` means :func:`default_guard`. Raises when the guard drops *every* requested re-init
    (RIFLE would silently be plain fine-tuning); warns when it drops some.
    """
    points = raw_points(total, reinits)
    if guard is None:
        guard = default_guard(total)
    if isinstance(guard, bool) or not isinstance(guard, int) or guard < 0:
        raise ValueError(f"guard must be an int >= 0, got {guard!r}")
    kept = [p for p in points if total - p >= guard]
    dropped = [p for p in points if total - p < guard]
    if points and not kept:
        raise ValueError(
            f"the guard ({guard} {unit}s of training after a re-init) drops every one of the "
            f"{reinits} re-init(s) at {unit}s {points} of a {total}-{unit} run; lower the guard, "
            f"use fewer re-inits or train longer"
        )
    if dropped and warn:
        warn_at_caller(
            f"RIFLE: re-init(s) at {unit}(s) {dropped} dropped: fewer than guard={guard} {unit}s of "
            f"training would follow them (run of {total} {unit}s)"
        )
    return Schedule(
        total=total, reinits=reinits, guard=guard, points=tuple(kept), dropped=tuple(dropped), unit=unit
    )


def steps_after(schedule: Schedule, steps_per_unit: int = 1) -> list[int]:
    """Optimizer steps available after each kept re-init until the next one (or the end)."""
    ends = [*schedule.points[1:], schedule.total]
    return [(end - p) * steps_per_unit for p, end in zip(schedule.points, ends)]


# Documented default for the step-budget warning. Evidence (REFERENCE.md §5): on a few-shot task,
# periods of 40 steps after a re-init cost about 3 points and 60 steps were neutral; on ELPV, 76-114
# steps gave +0.3 points. Fewer than ~100 optimizer steps rarely re-converge a fresh head.
DEFAULT_MIN_STEPS_AFTER = 100


def check_step_budget(
    schedule: Schedule, steps_per_unit: int, min_steps_after: int = DEFAULT_MIN_STEPS_AFTER
) -> list[int]:
    """Warn about periods after a re-init with fewer than ``min_steps_after`` optimizer steps.

    Returns the offending re-init points (empty when all periods are long enough).
    """
    short = [p for p, s in zip(schedule.points, steps_after(schedule, steps_per_unit)) if s < min_steps_after]
    if short:
        budget = steps_after(schedule, steps_per_unit)
        warn_at_caller(
            f"RIFLE: the period(s) after re-init(s) at {schedule.unit}(s) {short} have "
            f"{min(budget)} optimizer step(s), fewer than min_steps_after={min_steps_after}: the new "
            f"head may not re-converge (a probe lost ~3 points with 40-step periods). Train longer, "
            f"use fewer re-inits, or set min_steps_after to silence this."
        )
    return short
