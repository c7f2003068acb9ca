"""Did a re-init deliver "backprop in depth"? A cheap, always-on measurement around each re-init.

For each re-init: training loss / accuracy over the period before it (fed by the caller with
:meth:`Diagnosis.observe`), the head's weight norm just before / after, and the backbone gradient-norm
ratio after / before by backbone third, with the definitions of :mod:`rifle.analysis.depth`
(``--record-depth``): per conv / linear weight, mean gradient norm over the ``window`` optimizer steps
after the re-init / the ``window`` steps before it; the per-layer ratios averaged over the first /
middle / last third of the backbone in module order (head left out). Knows nothing of trainers.
Thresholds and their evidence: docs/rifle.md#when.

The same-batch head-signal ratio, a noise-free counterfactual (one ``nn.Linear`` head ``z = W f + b``
under mean-reduced cross-entropy): the error a sample sends into the backbone is
``e_i = Wᵀ(softmax(W f_i + b) − t_i)``. On the last training (micro-)batch before a re-init a forward
hook on the head keeps references to its input ``f`` (B×d) and output ``z``, and a tensor hook on ``z``
the gradient ``g = dL/dz``; the targets are recovered exactly as ``t_i = softmax(z_i) − B·g_i`` (hard
or smoothed labels). ``e_old`` uses the head as it stands just before the re-init, ``e_new`` the fresh
one, both on the same ``f`` and ``t``: ``head_signal_ratio = ‖E_new‖_F / ‖E_old‖_F`` (float64; squared
norms summed over data-parallel ranks). A recovered ``t`` that is not a distribution means the loss is
not mean cross-entropy on the head's logits: not measured.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .structure import LAYER_TYPES  # the layers of rifle.core.structure.weight_layers

# docs/rifle.md#when: the cut-offs and why (REFERENCE §7 measurements)
CONVERGED_LOSS = 0.2     # memorising runs had 0.03-0.17 before the re-init, the others 0.14-0.95
CONVERGED_ACC = 0.97     # ... 0.98-1.00 vs 0.71-0.95 (both must hold when both are known)
DELIVERED_RATIO = 1.0    # after/before: above the §7 controls (0.61-0.88); regime study: 0.31-2.05 (noisy)
WEAKENED_RATIO = 0.6     # below every fine-tuning control measured
# the same cut-offs judge head_signal_ratio when it is measured (to be re-justified by the regime study)
TARGET_TOL = 1e-3        # recovered targets: rows sum to 1 and entries lie in [0, 1], within this
DOC = "docs/rifle.md#when"


def backbone_weights(model: nn.Module, exclude: Sequence[nn.Module] = ()) -> list[tuple[str, torch.Tensor]]:
    """``[(name, weight)]`` of the conv / linear layers in module order, leaving out ``exclude``'s."""
    skip = {id(p) for m in exclude for p in m.parameters()}
    out = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, LAYER_TYPES) and isinstance(w, torch.Tensor) and id(w) not in skip \
                and w.requires_grad:
            out.append((f"{name}.weight" if name else "weight", w))
    return out


def thirds(values: Sequence[float]) -> list[float]:
    """Mean over the first / middle / last third (contiguous; the middle takes the remainder),
    exactly as :func:`rifle.analysis.depth.backbone_thirds`."""
    body = [float(v) for v in values]
    if not body:
        raise ValueError("no backbone layers")
    third = max(1, len(body) // 3)
    parts = [body[:third], body[third:len(body) - third] or body[third - 1:third], body[len(body) - third:]]
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
    stacked = torch.stack([v.to(dev, torch.float64) if isinstance(v, torch.Tensor)
                           else torch.tensor(float("nan") if v is None else float(v), dtype=torch.float64, device=dev)
                           for v in values]).tolist()
    return [None if v is None else x for v, x in zip(values, stacked)]


def sum_over_ranks(values: list[float]) -> list[float]:
    """Sum over data-parallel ranks (no-op alone); every rank calls it at the same re-init."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, rank 1, ...]`` (``[obj]`` alone); every rank calls it at the same moment."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def head_signal_sq(f: torch.Tensor, t: torch.Tensor, linear: nn.Linear) -> float:
    """``‖E‖_F²`` with ``e_i = Wᵀ(softmax(W f_i + b) − t_i)`` for this ``linear`` (float64)."""
    w = linear.weight.detach().to(f.device, torch.float64)
    z = f @ w.T
    if linear.bias is not None:
        z = z + linear.bias.detach().to(f.device, torch.float64)
    e = (torch.softmax(z, dim=1) - t) @ w
    return float((e * e).sum())


NO_CE = "not measured: the loss is not mean cross-entropy on the head's logits"


class Diagnosis:
    """Accumulate the numbers of one run's re-inits; see the module docstring.

    The owner calls: :meth:`observe` for each (micro-)batch; :meth:`new_period` where the loss window
    restarts (each epoch for epoch schedules); :meth:`arm` so that the next ``window`` recorded steps
    before a re-init are kept (a ring buffer: arming early costs only norms); :meth:`record_step` once
    per optimizer step with the final gradients (before ``optimizer.step()``); :meth:`begin` /
    :meth:`end` around the re-init itself. ``entries`` is the list of JSON-ready results.
    With ``head`` (the re-initialised modules), a forward hook on it captures the last training batch
    while armed (the head-signal ratio, module docstring); ``head_grad_scale`` is the factor by which
    the ``dL/dz`` that reaches the head's output exceeds the gradient of the micro-batch's mean
    cross-entropy (``1 / accumulation steps`` when each micro-batch loss is divided by their number;
    the AMP loss scale; ``None``: unknown, not measured).
    """

    def __init__(self, backbone: Sequence[tuple[str, torch.Tensor]], window: int = 5,
                 loss_window: int | None = None, head: Sequence[nn.Module] = ()) -> None:
        if window < 1:
            raise ValueError(f"diagnosis window must be >= 1 step, got {window}")
        self.names = [n for n, _ in backbone]
        self.params = [p for _, p in backbone]
        self.window = int(window)
        self.loss_window = loss_window  # None: everything since new_period(); else the last N steps
        # (by step index: observations keyed by set_step(); a feed every k steps keeps its meaning)
        self.entries: list[dict[str, Any]] = []
        self._before: deque = deque(maxlen=self.window)
        self._skip = 0
        self._armed = False
        self._after: list[torch.Tensor] | None = None
        self._open: dict[str, Any] | None = None
        self._obs: deque = deque()
        self._settled = False  # the window already holds sums over ranks (settle())
        self._before_norms: list[torch.Tensor] = []
        self._step_key: Any = None
        self.head_grad_scale: float | None = 1.0
        self._cap: list | None = None       # [f, z, dL/dz or None] of the last armed training batch
        self._frozen: dict | None = None    # {"f", "t"} (or {"why"}) recovered from _cap / a checkpoint
        self._hs: dict | None = None        # the open re-init's old squared norm, rows, reasons
        self._linear: nn.Linear | None = None
        self._head_why: str | None = None
        self._head_hook = None
        heads = list(head)
        if len(heads) == 1 and type(heads[0]) is nn.Linear:
            self._linear = heads[0]
            self._head_hook = heads[0].register_forward_hook(self._on_head_forward)
        else:
            self._head_why = ("not measured: the re-initialised modules are not exactly one nn.Linear"
                              if heads else None)
        self.new_period()

    # ------------------------------------------------------------------ same-batch head signal
    def _on_head_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Keep references (no copies) to the last armed training batch's head input and output, and
        to the gradient that reaches the output in its backward."""
        if not (self._armed and self._skip == 0 and module.training and torch.is_grad_enabled()):
            return  # (_skip > 0: steps before the last `window` of an epoch whose length is known)
        self._frozen = None
        f = args[0] if args else None
        if not (isinstance(f, torch.Tensor) and f.dim() == 2 and isinstance(output, torch.Tensor)
                and output.requires_grad):
            self._cap = ["not measured: the head's input is not a 2-D (batch x features) tensor"]
            return
        cap: list = [f.detach(), output.detach(), None]
        self._cap = cap

        def keep(g: torch.Tensor) -> None:
            cap[2] = g
        output.register_hook(keep)

    def _freeze(self) -> dict | None:
        """The captured batch as ``{"f", "t"}`` (float64, targets recovered) or ``{"why": reason}``."""
        if self._frozen is None and self._cap is not None:
            cap = self._cap
            if len(cap) == 1:
                self._frozen = {"why": cap[0]}
            elif cap[2] is None:
                self._frozen = {"why": "not measured: the last captured batch had no backward pass"}
            elif self.head_grad_scale is None or not self.head_grad_scale > 0:
                self._frozen = {"why": "not measured: the scale of the head's gradient is unknown "
                                       "(head_grad_scale=None, e.g. fp16 loss scaling)"}
            else:
                f, z, g = cap
                n = f.shape[0]
                t = torch.softmax(z.double(), dim=1) - (n / self.head_grad_scale) * g.double()
                ok = (t.dim() == 2 and t.shape[0] == n
                      and bool(((t.sum(1) - 1).abs() <= TARGET_TOL).all())
                      and bool((t >= -TARGET_TOL).all()) and bool((t <= 1 + TARGET_TOL).all()))
                self._frozen = {"f": f.double(), "t": t} if ok else {"why": NO_CE}
        return self._frozen

    def _head_begin(self) -> None:
        """Before the reset: the old head's squared norm on the captured batch (of every rank, when the
        batch was gathered by settle())."""
        frozen = self._freeze() if self._linear is not None else None
        self._cap = self._frozen = None
        hs: dict[str, Any] = {"why": self._head_why, "old": 0.0, "n": 0.0, "rows": None}
        if self._linear is not None:
            rows = frozen.get("ranks") if frozen is not None else None
            rows = rows if rows is not None else [frozen]
            hs["rows"], hs["gathered"] = rows, frozen is not None and "ranks" in frozen
            for r in rows:
                if r is not None and "why" not in r:
                    hs["old"] += head_signal_sq(r["f"], r["t"], self._linear)
                    hs["n"] += r["f"].shape[0]
        self._hs = hs

    def _head_end(self) -> dict[str, Any]:
        """After the reset: the fields ``head_signal_ratio / _old / _new / _reason``."""
        hs, self._hs = self._hs or {"why": self._head_why, "old": 0.0, "n": 0.0, "rows": [None],
                                    "gathered": False}, None
        out: dict[str, Any] = {"head_signal_ratio": None, "head_signal_old": None, "head_signal_new": None,
                               "head_signal_reason": hs["why"]}
        if self._linear is None:
            return out
        new = 0.0
        for r in hs["rows"]:
            if r is not None and "why" not in r:
                new += head_signal_sq(r["f"], r["t"], self._linear)
        no_ce = sum(1.0 for r in hs["rows"] if r is not None and r.get("why") == NO_CE)
        missing = sum(1.0 for r in hs["rows"] if r is None or ("why" in r and r["why"] != NO_CE))
        vals = [hs["old"], new, hs["n"], no_ce, missing]
        if not hs["gathered"]:
            vals = sum_over_ranks(vals)
        old, new, n, no_ce, missing = vals
        why = next((r["why"] for r in hs["rows"] if r is not None and "why" in r), None)
        if no_ce:
            out["head_signal_reason"] = NO_CE
        elif missing:
            out["head_signal_reason"] = why or ("not measured: no training batch was captured before the "
                                                "re-init (e.g. a run resumed right before it)")
        elif n > 0 and old > 0:
            out.update(head_signal_ratio=math.sqrt(new / old), head_signal_old=math.sqrt(old / n),
                       head_signal_new=math.sqrt(new / n), head_signal_reason=None)
        else:
            out["head_signal_reason"] = "not measured: the old head sent no error into the backbone"
        return out

    # ------------------------------------------------------------------ loss / accuracy
    def new_period(self) -> None:
        if self.loss_window is None:
            self._obs.clear()
            self._settled = False

    def set_step(self, key: Any) -> None:
        """Group the following observations under optimizer step ``key`` (for ``loss_window``)."""
        self._step_key = key

    def observe(self, loss: float | torch.Tensor, correct: float | torch.Tensor | None = None,
                count: int = 1) -> None:
        """One batch: its mean ``loss``, number of ``correct`` predictions (optional) and size."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().double()  # stays on the device: no host sync per step
        c = correct.detach() if isinstance(correct, torch.Tensor) else correct
        item = [loss * count, c, int(count)]
        if self._obs and (self.loss_window is None or self._obs[-1][3] == self._step_key):
            last = self._obs[-1]
            last[0] = last[0] + item[0]
            last[1] = None if last[1] is None or c is None else last[1] + c
            last[2] += item[2]
        else:
            self._obs.append([*item, self._step_key])
        if self.loss_window is not None and isinstance(self._step_key, int):
            while self._obs[0][3] is not None and self._obs[0][3] <= self._step_key - self.loss_window:
                self._obs.popleft()

    def _totals(self) -> tuple[float, float, float, bool]:
        """(loss sum, correct, count, accuracy known) of the window, summed over ranks."""
        has_acc = bool(self._obs) and all(o[1] is not None for o in self._obs)
        losses = _floats([o[0] for o in self._obs])
        hits = _floats([o[1] for o in self._obs]) if has_acc else [0.0] * len(self._obs)
        sums = [sum(losses), sum(hits), float(sum(o[2] for o in self._obs))]
        if not self._settled:
            sums = sum_over_ranks(sums)
        return sums[0], sums[1], sums[2], has_acc

    def settle(self) -> None:
        """Sum the loss window over ranks now (every rank calls it at the same moment), so that a
        checkpoint written by one rank holds the run's numbers: call it just before a checkpoint that
        precedes a re-init (the trainer does, at the end of the epoch before one)."""
        key = self._obs[-1][3] if self._obs else self._step_key
        loss_sum, correct, n, has_acc = self._totals()
        self._obs.clear()
        if n > 0:
            self._obs.append([loss_sum, correct if has_acc else None, n, key])
        self._settled = True
        if self._linear is not None and self._armed:  # the captured batch of every rank, on every rank
            frozen = self._freeze()
            if frozen is None or "ranks" not in frozen:
                local = None if frozen is None else {k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                     for k, v in frozen.items()}
                self._frozen = {"ranks": _gather(local)}

    def _loss_acc(self) -> tuple[float | None, float | None]:
        loss_sum, correct, n, has_acc = self._totals()
        self._settled = False
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
        return torch.stack([torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
                            if p.grad is not None else nan for p in self.params])

    # ------------------------------------------------------------------ around a re-init
    def begin(self, index: int, unit: str, at: int, head: Sequence[nn.Module]) -> None:
        """Just before re-init ``index`` (at ``unit`` ``at``): freeze the 'before' side."""
        if self._open is not None:
            self._finish()
        loss, acc = self._loss_acc()
        self._open = {"index": int(index), "unit": unit, "at": int(at), "train_loss_before": loss,
                      "train_acc_before": acc, "head_norm_before": weight_norm(head)}
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
        written between two steps measures what the uninterrupted run measured. Plain floats."""
        def rows(ts):
            return [t.tolist() for t in ts]
        return {"armed": self._armed, "skip": self._skip, "before": rows(self._before),
                "settled": self._settled,
                "obs": [[ls, c, int(o[2]), o[3]] for o, ls, c in zip(self._obs, _floats([o[0] for o in self._obs]),
                                                                      _floats([o[1] for o in self._obs]))],
                "open": dict(self._open) if self._open is not None else None,
                "before_norms": rows(self._before_norms),
                "after": rows(self._after) if self._after is not None else None,
                "head_batch": _batch_state(self._freeze()) if self._armed and self._linear is not None
                else None}

    def load_pending_state(self, state: dict[str, Any]) -> None:
        dev = self._device()

        def tensors(rows):
            return [torch.tensor(r, dtype=torch.float64, device=dev) for r in rows]
        self._armed, self._skip = bool(state["armed"]), int(state["skip"])
        self._before = deque(tensors(state["before"]), maxlen=self.window)
        self._settled = bool(state["settled"])
        self._obs = deque([list(o) for o in state["obs"]])
        self._open = dict(state["open"]) if state["open"] is not None else None
        self._before_norms = tensors(state["before_norms"])
        self._after = tensors(state["after"]) if state["after"] is not None else None
        self._cap, self._frozen = None, _batch_load(state.get("head_batch"), dev)


def _batch_state(frozen: dict | None) -> dict | None:
    """A frozen captured batch as plain floats (JSON-ready: the HF callback keeps the state there)."""
    def one(r):
        if r is None or "why" in r:
            return r
        return {"f": r["f"].tolist(), "t": r["t"].tolist()}
    if frozen is not None and "ranks" in frozen:
        return {"ranks": [one(r) for r in frozen["ranks"]]}
    return one(frozen)


def _batch_load(state: dict | None, dev: torch.device) -> dict | None:
    def one(r):
        if r is None or "why" in r:
            return r
        return {k: torch.tensor(r[k], dtype=torch.float64, device=dev) for k in ("f", "t")}
    if state is not None and "ranks" in state:
        return {"ranks": [one(r) for r in state["ranks"]]}
    return one(state)


def converged(entry: dict[str, Any]) -> bool | None:
    """Loss <= CONVERGED_LOSS and accuracy >= CONVERGED_ACC (each where measured); None: neither."""
    loss, acc = entry.get("train_loss_before"), entry.get("train_acc_before")
    if loss is None and acc is None:
        return None
    return (loss is None or loss <= CONVERGED_LOSS) and (acc is None or acc >= CONVERGED_ACC)


def verdict(entry: dict[str, Any]) -> str:
    """The one line a user reads, e.g. ``re-init 1 (epoch 15): head had converged (...) ...``."""
    conv = converged(entry)
    loss, acc = entry.get("train_loss_before"), entry.get("train_acc_before")
    stats = ", ".join(s for s in (f"train loss {loss:.2f}" if loss is not None else "",
                                  f"acc {acc:.2f}" if acc is not None else "") if s)
    head = ("head convergence not measured (no training loss observed before it)" if conv is None else
            f"head had {'' if conv else 'not '}converged ({stats})")
    g, hs = entry.get("grad_ratio"), entry.get("head_signal_ratio")
    if g is None:
        grad = ("backbone gradient not measured (no optimizer steps recorded on both sides of the "
                "re-init)")
    else:
        grad = f"backbone gradient x{g:.2f} after/before"
    r = hs if hs is not None else g  # the same-batch counterfactual decides when it was measured
    if hs is not None:
        grad = f"error signal into the backbone x{hs:.2f} on the same batch (new head vs old), {grad}"
    if r is None:
        tail = ""
    elif r >= DELIVERED_RATIO:
        tail = " — backprop in depth delivered"
    elif r < WEAKENED_RATIO:
        tail = " — this re-init weakened the error signal"
    elif hs is not None:
        tail = (f" — the new head sends less error into the backbone than the old one "
                f"({WEAKENED_RATIO}-{DELIVERED_RATIO}): no deeper backprop")
    else:
        tail = (f" — within fine-tuning's own decay at a boundary ({WEAKENED_RATIO}-{DELIVERED_RATIO}): "
                f"no deeper backprop than without the re-init")
    if conv is False and (r is None or r < DELIVERED_RATIO):
        tail += f"; not the paper's mechanism here: judge RIFLE on validation ({DOC})"
    elif conv and r is not None and r < DELIVERED_RATIO:
        tail += f"; the head had converged yet the error signal did not grow ({DOC})"
    return f"re-init {entry['index']} ({entry['unit']} {entry['at']}): {head}; {grad}{tail}"
