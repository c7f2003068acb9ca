"""The same-batch head-signal ratio of a re-init: how much more error the new head sends into the
backbone than the old one, on the same batch (a noise-free counterfactual; docs/rifle.md#when).

For one ``nn.Linear`` head ``z = W f + b`` under mean-reduced cross-entropy, a sample's error into the
backbone is ``e_i = Wᵀ(softmax(W f_i + b) − t_i)``; the targets are recovered from the gradient at the
head's output, ``t_i = softmax(z_i) − B·g_i``, and ``head_signal_ratio = ‖E_new‖_F / ‖E_old‖_F``.
:class:`HeadSignal` is the part of :class:`rifle.core.diagnosis.Diagnosis` that measures it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .replicas import sum_over_ranks

TARGET_TOL = 1e-3  # recovered targets: rows sum to 1 and entries lie in [0, 1], within this


def target_tol(*dtypes: torch.dtype) -> float:
    """The tolerance of the recovered targets for logits / gradients of these dtypes: TARGET_TOL, or
    ``2 * eps`` of the least precise one (bf16: 2**-6). Rounding ``dL/dz`` to a dtype of machine epsilon
    ``eps`` moves each entry of ``B * dL/dz = softmax(z) - t`` by at most ``eps/2`` of itself, hence a
    row's sum by at most ``eps`` (its entries' magnitudes sum to <= 2); a 16-bit softmax adds as much."""
    return max([TARGET_TOL] + [2 * torch.finfo(d).eps for d in dtypes if d.is_floating_point])


def head_signal_sq(f: torch.Tensor, t: torch.Tensor, linear: nn.Linear) -> float:
    """``‖E‖_F²`` with ``e_i = Wᵀ(softmax(W f_i + b) − t_i)`` for this ``linear`` (float64)."""
    w = linear.weight.detach().to(f.device, torch.float64)
    f = f.to(torch.float64)
    z = f @ w.T
    if linear.bias is not None:
        z = z + linear.bias.detach().to(f.device, torch.float64)
    e = (torch.softmax(z, dim=1) - t) @ w
    return float((e * e).sum())


NO_CE = (
    "not measured: the targets recovered from the gradient at the head's logits are no probability "
    "distribution: the loss is not mean cross-entropy on them, or head_grad_scale is not its scale"
)
NO_SCALE = (
    "not measured: the scale of the head's gradient is unknown (head_grad_scale=None: an fp16 "
    "GradScaler's loss scale, or gradient accumulation scaled in a way the trainer does not expose)"
)


class HeadSignal:
    """Mixin of :class:`rifle.core.diagnosis.Diagnosis`: capture the last armed training batch at the
    head, then measure the old and the new head on it around the re-init. Reads the owner's ``_armed``
    and ``_skip`` (the arming of the 'before' window) and ``head_grad_scale``."""

    _armed: bool
    _skip: int
    head_grad_scale: float | None

    def _init_head_signal(self, head: Sequence[nn.Module]) -> None:
        self._cap: list[Any] | None = None  # [f, z, dL/dz or None] of the last armed training batch
        self._frozen: dict[str, Any] | None = (
            None  # {"f", "t"} (or {"why"}) recovered from _cap / a checkpoint
        )
        self._hs: dict[str, Any] | None = None  # the open re-init's old squared norm, rows, reasons
        self._linear: nn.Linear | None = None
        self._head_why: str | None = None
        heads = list(head)
        if len(heads) == 1 and type(heads[0]) is nn.Linear:
            self._linear = heads[0]
            heads[0].register_forward_hook(self._on_head_forward)
        else:
            self._head_why = (
                "not measured: the re-initialised modules are not exactly one nn.Linear" if heads else None
            )

    def _on_head_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Keep references (no copies) to the last armed training batch's head input and output, and
        to the gradient that reaches the output in its backward."""
        if not (self._armed and self._skip == 0 and module.training and torch.is_grad_enabled()):
            return  # (_skip > 0: steps before the last `window` of an epoch whose length is known)
        self._frozen = None
        f = args[0] if args else None
        if not (
            isinstance(f, torch.Tensor)
            and f.dim() == 2
            and isinstance(output, torch.Tensor)
            and output.requires_grad
        ):
            self._cap = ["not measured: the head's input is not a 2-D (batch x features) tensor"]
            return
        cap: list[Any] = [f.detach(), output.detach(), None]
        self._cap = cap

        def keep(g: torch.Tensor) -> None:
            cap[2] = g

        output.register_hook(keep)

    def _freeze(self) -> dict[str, Any] | None:
        """The captured batch as ``{"f", "t"}`` (f as captured, the targets recovered in float64) or
        ``{"why": reason}``."""
        if self._frozen is None and self._cap is not None:
            cap = self._cap
            if len(cap) == 1:
                self._frozen = {"why": cap[0]}
            elif cap[2] is None:
                self._frozen = {"why": "not measured: the last captured batch had no backward pass"}
            elif self.head_grad_scale is None or not self.head_grad_scale > 0:
                self._frozen = {"why": NO_SCALE}
            else:
                f, z, g = cap
                n = f.shape[0]
                # recovered in float64 from the captured (possibly bf16) tensors; the tolerance is the
                # rounding of the gradient's / logits' dtype (bf16 autocast: docs/rifle.md#when)
                t = torch.softmax(z.double(), dim=1) - (n / self.head_grad_scale) * g.double()
                tol = target_tol(z.dtype, g.dtype)
                ok = (
                    t.dim() == 2
                    and t.shape[0] == n
                    and bool(((t.sum(1) - 1).abs() <= tol).all())
                    and bool((t >= -tol).all())
                    and bool((t <= 1 + tol).all())
                )
                self._frozen = {"f": f, "t": t} if ok else {"why": NO_CE}
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
        hs, self._hs = (
            self._hs or {"why": self._head_why, "old": 0.0, "n": 0.0, "rows": [None], "gathered": False},
            None,
        )
        out: dict[str, Any] = {
            "head_signal_ratio": None,
            "head_signal_old": None,
            "head_signal_new": None,
            "head_signal_reason": hs["why"],
        }
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
            out["head_signal_reason"] = why or (
                "not measured: no training batch was captured before the "
                "re-init (e.g. a run resumed right before it)"
            )
        elif n > 0 and old > 0:
            out.update(
                head_signal_ratio=math.sqrt(new / old),
                head_signal_old=math.sqrt(old / n),
                head_signal_new=math.sqrt(new / n),
                head_signal_reason=None,
            )
        else:
            out["head_signal_reason"] = "not measured: the old head sent no error into the backbone"
        return out

    def _head_batch_state(self) -> dict[str, Any] | None:
        """The armed captured batch for a checkpoint (``Diagnosis.pending_state``), or None."""
        return _batch_state(self._freeze()) if self._armed and self._linear is not None else None

    def _load_head_batch(self, state: dict[str, Any] | None, dev: torch.device) -> None:
        self._cap, self._frozen = None, _batch_load(state, dev)


def _batch_state(frozen: dict[str, Any] | None) -> dict[str, Any] | None:
    """A frozen captured batch as CPU tensors (f in its captured dtype, t float64: a resume measures
    exactly what the uninterrupted run did); :func:`plain_state` makes it JSON-ready."""

    def one(r: dict[str, Any] | None) -> dict[str, Any] | None:
        if r is None or "why" in r:
            return r
        return {k: r[k].detach().to("cpu").clone() for k in ("f", "t")}  # clone: no larger storage saved

    if frozen is not None and "ranks" in frozen:
        return {"ranks": [one(r) for r in frozen["ranks"]]}
    return one(frozen)


def _batch_load(state: dict[str, Any] | None, dev: torch.device) -> dict[str, Any] | None:
    """Tensors (or, from a JSON state or one written before they were tensors, nested lists)."""

    def one(r: dict[str, Any] | None) -> dict[str, Any] | None:
        if r is None or "why" in r:
            return r
        return {
            k: (
                r[k].to(dev)
                if isinstance(r[k], torch.Tensor)
                else torch.tensor(r[k], dtype=torch.float64, device=dev)
            )
            for k in ("f", "t")
        }

    if state is not None and "ranks" in state:
        return {"ranks": [one(r) for r in state["ranks"]]}
    return one(state)


def plain_state(value: Any) -> Any:
    """``value`` (a :meth:`rifle.core.Rifle.state_dict`) with every tensor as nested lists: JSON-ready,
    for a trainer that keeps the state in JSON (the HF callback). Loading it back measures in float64."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_state(v) for v in value]
    return value
