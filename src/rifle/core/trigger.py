"""``trigger="converged"``: re-initialise once the head has converged instead of at fixed points.

At the start of epoch ``e >= 1`` a re-init fires when the training accuracy over epoch ``e - 1``
(summed over data-parallel ranks) reaches ``converged_acc``; at most K times, never inside the guard,
the next one only after a full epoch after the previous re-init epoch (docs/rifle.md#trigger).
A variant of RIFLE's fixed schedule (Li et al., ICML 2020, arXiv 2007.03349); :class:`ConvergedTrigger`
is the part of :class:`rifle.core.Rifle` that decides it.
"""

from __future__ import annotations

from typing import Any

import torch

from .replicas import sum_over_ranks
from .schedule import Schedule, default_guard


class ConvergedTrigger:
    """The epochs' training accuracy and the re-inits it fired (``fired``: 0-based epochs).

    The owner feeds :meth:`observe` per batch, calls :meth:`decide` at each epoch start (True: a re-init
    fires now) and :meth:`settle` at each epoch end; the bounds (K, length, guard) are the owner's
    :class:`~rifle.core.schedule.Schedule`, passed where needed.
    """

    def __init__(self, converged_acc: float) -> None:
        self.converged_acc = converged_acc
        self.fired: list[int] = []  # epochs it re-initialised at (= the schedule's points)
        self.history: list[list[Any]] = []  # [[epoch, reduced train accuracy or None], ...]
        self.epoch: int | None = None  # the epoch whose observations are accumulating
        self.reset()

    def reset(self) -> None:
        self.correct: Any = 0.0  # stays a device tensor when fed tensors: no host sync per step
        self.count, self.has = 0, True

    def observe(self, correct: float | torch.Tensor | None, count: int) -> None:
        if correct is None:
            self.has = False
        else:
            self.correct = self.correct + (
                correct.detach() if isinstance(correct, torch.Tensor) else float(correct)
            )
        self.count += int(count)

    def may_fire(self, t: int, s: Schedule) -> bool:
        return (
            len(self.fired) < s.reinits
            and 1 <= t < s.total
            and s.total - t >= s.guard
            and (not self.fired or t - 1 > self.fired[-1])
        )

    def settle(self) -> None:
        """Close the accuracy of the epoch being observed, summed over data-parallel ranks."""
        if self.epoch is None:
            return
        if self.history and self.history[-1][0] == self.epoch:
            return  # already settled
        vals = sum_over_ranks([float(self.correct), float(self.count), 0.0 if self.has else 1.0])
        acc = vals[0] / vals[1] if vals[1] > 0 and vals[2] == 0 else None
        self.history.append([self.epoch, acc])
        self.reset()

    def decide(self, epoch: int, s: Schedule) -> bool:
        """At the start of ``epoch``: whether a re-init fires now (then ``epoch`` is appended to
        ``fired``)."""
        if epoch >= 1 and self.epoch == epoch - 1:
            self.settle()
        last = self.history[-1] if self.history else None
        acc = last[1] if last is not None and last[0] == epoch - 1 else None
        if self.epoch != epoch:
            self.epoch = epoch
            self.reset()
        if acc is not None and acc >= self.converged_acc and self.may_fire(epoch, s):
            self.fired.append(epoch)
            return True
        return False

    def report(self, s: Schedule) -> dict[str, Any]:
        """``{"trigger", "converged_acc", "fired", "train_acc", "reason"}``; see ``Rifle.trigger_report``."""
        thr = self.converged_acc
        accs = [(e, a) for e, a in self.history if a is not None]
        last_start = s.total - s.guard
        reason = None
        if len(self.fired) < s.reinits:
            after = self.fired[-1] if self.fired else -1
            cand = [(e, a) for e, a in accs if e > after]
            reached = [e for e, a in cand if a >= thr]
            if not accs:
                reason = (
                    "no training accuracy was observed (feed observe(loss, correct=..., count=...) "
                    "every batch)"
                )
            elif reached:
                reason = (
                    f"train accuracy reached {thr:g} at epoch {reached[0]}"
                    + (f" (after the re-init at epoch {after})" if self.fired else "")
                    + f"; a re-init after it would leave fewer than guard={s.guard} epochs "
                    f"(the last allowed start is epoch {last_start})"
                )
            else:
                best = max(cand or accs, key=lambda x: (x[1], -x[0]))
                reason = (
                    f"train accuracy never reached {thr:g}"
                    + (f" again after the re-init at epoch {after}" if self.fired else "")
                    + (f" (best {best[1]:.2f} at epoch {best[0]})" if cand else "")
                )
            if self.fired:
                reason = f"{len(self.fired)} of {s.reinits} re-init(s): {reason}"
        return {
            "trigger": "converged",
            "converged_acc": thr,
            "fired": list(self.fired),
            "train_acc": [[e, a] for e, a in self.history],
            "reason": reason,
        }

    def state_dict(self, s: Schedule) -> dict[str, Any]:
        return {
            "trigger": "converged",
            "converged_acc": self.converged_acc,
            "guard": s.guard,
            "fired": list(self.fired),
            "trigger_history": [list(h) for h in self.history],
            "trigger_window": {
                "epoch": self.epoch,
                "correct": float(self.correct),
                "count": self.count,
                "has": self.has,
            },
        }

    def load_state_dict(self, state: dict[str, Any], unit: str, s: Schedule) -> None:
        """Restore from :meth:`state_dict`; a state of other settings is refused (``ValueError``)."""
        mine = (unit, s.total, s.reinits, s.guard, self.converged_acc)
        theirs = (
            state.get("unit"),
            state.get("total"),
            state.get("reinits"),
            state.get("guard"),
            state.get("converged_acc"),
        )
        if mine != theirs:
            raise ValueError(
                f"RIFLE trigger state is for (unit, length, reinits, guard, converged_acc) = "
                f"{theirs}, this run has {mine}; resume with the same settings"
            )
        self.fired = [int(e) for e in state["fired"]]
        self.history = [[int(e), a] for e, a in state["trigger_history"]]
        w = state["trigger_window"]
        self.epoch = w["epoch"]
        self.correct, self.count, self.has = float(w["correct"]), int(w["count"]), bool(w["has"])


def trigger_schedule(total: int, reinits: int, guard: int | None) -> Schedule:
    """The trigger's bounds (no fixed points): K, the length and the guard, validated as a schedule's."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"the run length must be an int >= 1, got {total!r}")
    if isinstance(reinits, bool) or not isinstance(reinits, int) or reinits < 0:
        raise ValueError(
            f"reinits (K, the number of re-initialisations) must be an int >= 0, got {reinits!r}"
        )
    guard = default_guard(total) if guard is None else guard
    if isinstance(guard, bool) or not isinstance(guard, int) or guard < 0:
        raise ValueError(f"guard must be an int >= 0, got {guard!r}")
    if reinits and total - max(guard, 1) < 1:
        raise ValueError(
            f"trigger='converged': the guard ({guard} epochs of training after a re-init) "
            f"leaves no epoch >= 1 to re-initialise at in a {total}-epoch run; lower the "
            f"guard or train longer"
        )
    return Schedule(total=total, reinits=reinits, guard=guard, points=(), dropped=(), unit="epoch")
