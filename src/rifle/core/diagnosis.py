"""Did a re-init deliver "backprop in depth"? A cheap, always-on measurement around each re-init.

For each re-init: training loss / accuracy over the period before it, the head's weight norm just
before / after, the backbone gradient-norm ratio after / before by backbone third (the definitions of
:mod:`rifle.analysis.depth`), and the same-batch head-signal ratio (:mod:`rifle.core.head_signal`); the
verdict line is :mod:`rifle.core.verdict`. Knows nothing of trainers. Definitions, thresholds and their
evidence: docs/rifle.md#when. RIFLE: Li et al., ICML 2020, arXiv 2007.03349.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .head_signal import HeadSignal
from .replicas import gather_over_ranks, sum_over_ranks
from .structure import weight_layers
from .verdict import verdict


def backbone_weights(model: nn.Module, exclude: Sequence[nn.Module] = ()) -> list[tuple[str, torch.Tensor]]:
    """``[(name, weight)]`` of the conv / linear layers in module order, leaving out ``exclude``'s."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    return [
        (f"{name}.weight" if name else "weight", m.weight)
        for name, m in weight_layers(model)
        if id(m.weight) not in skip and m.weight.requires_grad
    ]


def thirds(values: Sequence[float]) -> list[float]:
    """Mean over the first / middle / last third (contiguous; the middle takes the remainder),
    exactly as :func:`rifle.analysis.depth.backbone_thirds`."""
    body = [float(v) for v in values]
    if not body:
        raise ValueError("no backbone layers")
    third = max(1, len(body) // 3)
    parts = [
        body[:third],
        body[third : len(body) - third] or body[third - 1 : third],
        body[len(body) - third :],
    ]
    return [sum(x) / len(x) for x in parts]


def weight_norm(modules: Sequence[nn.Module]) -> float:
    """``sqrt(sum ||W||^2)`` over the modules' ``weight`` tensors (one Linear: ``||W||_F``)."""
    total = 0.0
    for m in modules:
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            total += float(torch.linalg.vector_norm(w.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(total)


def _floats(values: Sequence[Any]) -> list[float | None]:
    """Python floats of numbers / 0-d tensors with one host transfer (not one per tensor)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [None if v is None else float(v) for v in values]
    dev = tensors[0].device
    stacked = torch.stack(
        [
            v.to(dev, torch.float64)
            if isinstance(v, torch.Tensor)
            else torch.tensor(float("nan") if v is None else float(v), dtype=torch.float64, device=dev)
            for v in values
        ]
    ).tolist()
    return [None if v is None else x for v, x in zip(values, stacked)]


class Diagnosis(HeadSignal):
    """Accumulate the numbers of one run's re-inits; see the module docstring.

    The owner calls: :meth:`observe` for each (micro-)batch; :meth:`new_period` where the loss window
    restarts (each epoch for epoch schedules); :meth:`arm` so that the next ``window`` recorded steps
    before a re-init are kept (a ring buffer: arming early costs only norms); :meth:`record_step` once
    per optimizer step with the final gradients (before ``optimizer.step()``); :meth:`begin` /
    :meth:`end` around the re-init itself. ``entries`` is the list of JSON-ready results.
    With ``head`` (the re-initialised modules), a forward hook on it captures the last training batch
    while armed (the head-signal ratio, :mod:`rifle.core.head_signal`); ``head_grad_scale`` is the factor
    by which the ``dL/dz`` that reaches the head's output exceeds the gradient of the micro-batch's mean
    cross-entropy (``1 / accumulation steps`` when each micro-batch loss is divided by their number;
    the AMP loss scale; ``None``: unknown, not measured).
    """

    def __init__(
        self,
        backbone: Sequence[tuple[str, torch.Tensor]],
        window: int = 5,
        loss_window: int | None = None,
        head: Sequence[nn.Module] = (),
    ) -> None:
        if window < 1:
            raise ValueError(f"diagnosis window must be >= 1 step, got {window}")
        self.names = [n for n, _ in backbone]
        self.params = [p for _, p in backbone]
        self.window = int(window)
        self.loss_window = loss_window  # None: everything since new_period(); else the last N steps
        # (by step index: observations keyed by set_step(); a feed every k steps keeps its meaning)
        self.entries: list[dict[str, Any]] = []
        self._before: deque[torch.Tensor] = deque(maxlen=self.window)
        self._skip = 0
        self._armed = False
        self._after: list[torch.Tensor] | None = None
        self._open: dict[str, Any] | None = None
        self._obs: deque[list[Any]] = deque()
        self._n_settled = 0  # the window's first rows already hold sums over ranks (settle())
        self._before_norms: list[torch.Tensor] = []
        self._step_key: Any = None
        self.head_grad_scale: float | None = 1.0
        self._init_head_signal(head)
        self.new_period()

    # ------------------------------------------------------------------ loss / accuracy
    def new_period(self) -> None:
        if self.loss_window is None:
            self._obs.clear()
            self._n_settled = 0

    def set_step(self, key: Any) -> None:
        """Group the following observations under optimizer step ``key`` (for ``loss_window``)."""
        self._step_key = key

    def observe(
        self, loss: float | torch.Tensor, correct: float | torch.Tensor | None = None, count: int = 1
    ) -> None:
        """One batch: its mean ``loss``, number of ``correct`` predictions (optional) and size."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().double()  # stays on the device: no host sync per step
        c = correct.detach() if isinstance(correct, torch.Tensor) else correct
        item = [loss * count, c, int(count)]
        if len(self._obs) > self._n_settled and (
            self.loss_window is None or self._obs[-1][3] == self._step_key
        ):
            last = self._obs[-1]
            last[0] = last[0] + item[0]
            last[1] = None if last[1] is None or c is None else last[1] + c
            last[2] += item[2]
        else:
            self._obs.append([*item, self._step_key])
        if self.loss_window is not None and isinstance(self._step_key, int):
            while self._obs[0][3] is not None and self._obs[0][3] <= self._step_key - self.loss_window:
                self._obs.popleft()
                self._n_settled = max(0, self._n_settled - 1)

    def _totals(self) -> tuple[float, float, float, bool]:
        """(loss sum, correct, count, accuracy known) of the window, summed over ranks (the rows that
        settle() summed already are not summed again)."""
        has_acc = bool(self._obs) and all(o[1] is not None for o in self._obs)
        losses = [0.0 if v is None else v for v in _floats([o[0] for o in self._obs])]
        hits = [0.0 if v is None else v for v in _floats([o[1] for o in self._obs])] if has_acc else []
        hits = hits or [0.0] * len(self._obs)
        k, counts = self._n_settled, [float(o[2]) for o in self._obs]
        sums = [sum(losses[k:]), sum(hits[k:]), sum(counts[k:])]
        if k < len(self._obs) or not self._obs:
            sums = sum_over_ranks(sums)
        return sums[0] + sum(losses[:k]), sums[1] + sum(hits[:k]), sums[2] + sum(counts[:k]), has_acc

    def settle(self) -> None:
        """Sum the loss window over ranks now, row by row (every rank calls it at the same moment), so
        that a checkpoint written by one rank holds the run's numbers: call it before a checkpoint that
        a re-init's loss window spans (the trainer does: at the end of the epoch before an epoch re-init,
        at every epoch's end with step re-inits, whose window of the last steps_per_epoch steps may
        span it). Rows observed later are summed at the re-init, as before."""
        k = self._n_settled
        rows = list(self._obs)[k:]
        values: list[float] = []
        for row, ls, c in zip(rows, _floats([o[0] for o in rows]), _floats([o[1] for o in rows])):
            values += [0.0 if ls is None else ls, 0.0 if c is None else c, float(row[2])]
        if values:
            total = sum_over_ranks(values)
            for i, row in enumerate(rows):
                row[0], row[1] = total[3 * i], None if row[1] is None else total[3 * i + 1]
                row[2] = int(round(total[3 * i + 2]))
        self._n_settled = len(self._obs)
        if self._linear is not None and self._armed:  # the captured batch of every rank, on every rank
            frozen = self._freeze()
            if frozen is None or "ranks" not in frozen:
                local = (
                    None
                    if frozen is None
                    else {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in frozen.items()}
                )
                self._frozen = {"ranks": gather_over_ranks(local)}

    def _loss_acc(self) -> tuple[float | None, float | None]:
        loss_sum, correct, n, has_acc = self._totals()
        if n <= 0:
            return None, None
        return loss_sum / n, (correct / n if has_acc else None)

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    # ------------------------------------------------------------------ gradients
    def arm(self, skip: int = 0) -> None:
        """Keep the norms of the recorded steps from now on (after ``skip`` steps) in the ring buffer."""
        if not self._armed:
            self._before.clear()
            self._cap = self._frozen = None
        self._armed, self._skip = True, int(skip)

    def disarm(self) -> None:
        """Stop keeping 'before' norms (no re-init follows after all); an open 'after' window stays."""
        self._armed, self._skip = False, 0
        self._before.clear()
        self._cap = self._frozen = None

    @property
    def recording(self) -> bool:
        return self._armed or self._after is not None

    def record_step(self) -> None:
        """Call with the step's final gradients (e.g. from an optimizer step pre-hook)."""
        if self._after is not None:
            self._after.append(self._norms())
            if len(self._after) >= self.window:
                self._finish()
        elif self._armed:
            if self._skip > 0:
                self._skip -= 1
            else:
                self._before.append(self._norms())

    def _norms(self) -> torch.Tensor:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self._device())
        return torch.stack(
            [
                torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) if p.grad is not None else nan
                for p in self.params
            ]
        )

    # ------------------------------------------------------------------ around a re-init
    def begin(self, index: int, unit: str, at: int, head: Sequence[nn.Module]) -> None:
        """Just before re-init ``index`` (at ``unit`` ``at``): freeze the 'before' side."""
        if self._open is not None:
            self._finish()
        loss, acc = self._loss_acc()
        self._open = {
            "index": int(index),
            "unit": unit,
            "at": int(at),
            "train_loss_before": loss,
            "train_acc_before": acc,
            "head_norm_before": weight_norm(head),
        }
        self._head_begin()
        self._before_norms = list(self._before)
        self._armed, self._before = False, deque(maxlen=self.window)

    def end(self, head: Sequence[nn.Module]) -> None:
        """Just after the re-init: the new head's norm; start the 'after' window."""
        assert self._open is not None, "begin() first"
        self._open["head_norm_after"] = weight_norm(head)
        self._open.update(self._head_end())
        self._after = []

    def close(self) -> None:
        """Finish an open entry with the steps recorded so far (end of training, or of an epoch)."""
        if self._open is not None and self._after is not None:
            self._finish()

    def _finish(self) -> None:
        assert self._open is not None  # opened by end() with _after; every caller checks one of them
        e, before, after = self._open, self._before_norms, self._after or []
        self._open, self._after, self._before_norms = None, None, []
        e["steps_before"], e["steps_after"] = len(before), len(after)
        e["grad_ratio_layers"] = None
        e["grad_ratio_thirds"] = e["grad_ratio"] = None
        if before and after and self.params:
            mb = torch.stack(before).mean(0).tolist()
            ma = torch.stack(after).mean(0).tolist()
            per = [a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else None for a, b in zip(ma, mb)]
            e["grad_ratio_layers"] = per
            vals = [v for v in per if v is not None]
            if vals:
                e["grad_ratio_thirds"] = thirds(vals)
                e["grad_ratio"] = sum(e["grad_ratio_thirds"]) / 3
        e["verdict"] = verdict(e)
        self.entries.append(e)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def load_state_dict(self, entries: Sequence[dict[str, Any]]) -> None:
        self.entries = [dict(e) for e in entries]

    def pending_state(self) -> dict[str, Any]:
        """What is being measured now (windows, loss sums), so that a run resumed from a checkpoint
        written between two steps measures what the uninterrupted run measured. Plain floats, and the
        captured batch as tensors (``head_batch``, only while armed)."""

        def rows(ts: Sequence[torch.Tensor]) -> list[Any]:
            return [t.tolist() for t in ts]

        return {
            "armed": self._armed,
            "skip": self._skip,
            "before": rows(self._before),
            "settled": self._n_settled == len(self._obs),
            "settled_rows": self._n_settled,
            "obs": [
                [ls, c, int(o[2]), o[3]]
                for o, ls, c in zip(
                    self._obs, _floats([o[0] for o in self._obs]), _floats([o[1] for o in self._obs])
                )
            ],
            "open": dict(self._open) if self._open is not None else None,
            "before_norms": rows(self._before_norms),
            "after": rows(self._after) if self._after is not None else None,
            "head_batch": self._head_batch_state(),
        }

    def load_pending_state(self, state: dict[str, Any]) -> None:
        dev = self._device()

        def tensors(rows: Sequence[Any]) -> list[torch.Tensor]:
            return [torch.tensor(r, dtype=torch.float64, device=dev) for r in rows]

        self._armed, self._skip = bool(state["armed"]), int(state["skip"])
        self._before = deque(tensors(state["before"]), maxlen=self.window)
        self._obs = deque([list(o) for o in state["obs"]])
        rows = state.get("settled_rows")  # states before it: all rows or none
        self._n_settled = int(rows) if rows is not None else len(self._obs) if state["settled"] else 0
        self._open = dict(state["open"]) if state["open"] is not None else None
        self._before_norms = tensors(state["before_norms"])
        self._after = tensors(state["after"]) if state["after"] is not None else None
        self._load_head_batch(state.get("head_batch"), dev)
