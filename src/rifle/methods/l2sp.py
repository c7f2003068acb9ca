"""L2-SP: weight decay towards the pretrained weights (the "starting point") instead of towards zero.

Paper: Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks", ICML 2018, arXiv 1802.01483. Regulariser (their eq. for L2-SP)::

    Omega(w) = alpha/2 * ||w_S - w0_S||^2  +  beta/2 * ||w_head||^2

``w_S`` are the parameters of the pretrained part (the backbone), ``w0_S`` their pretrained values,
``w_head`` the new classifier head (no pretrained value: plain L2). No weight decay is applied on top.

Defaults: ``alpha = 0.01``, ``beta = 1e-4`` - the official RIFLE harness (REFERENCE.md §2, "L2-SP"
row: alpha=0.01 on the distance to the pretrained backbone, beta=1e-4 on the head, no weight decay).
The paper selects alpha and beta per dataset by cross-validation.

Decisions where the paper is vague:

* every trainable backbone **parameter** is pulled to its pretrained value: conv/linear weights,
  biases and BatchNorm affine weights/biases alike (the paper's "all weights of the pretrained part";
  the authors' code and TLlib do the same). **Buffers** (BatchNorm running mean/var, counters) are not
  parameters and are excluded. Frozen parameters (``requires_grad=False``) are ignored.
* the head term covers the head's weight **and** bias (as the authors' code).
* weight decay is set to 0 in every parameter group; a non-zero ``--weight-decay`` is logged as ignored.
* the head found by the trainer (``ctx.head``) defines "head"; after a RIFLE re-init the head term
  simply applies to the new head values.

Efficiency: one custom autograd function computes the squared distance with ``torch._foreach_*``
kernels (one fused pass over all backbone tensors) and returns ``2 (w - w0)`` in backward, with no
per-tensor autograd graph (about 2x faster than a Python loop of ``(p - p0).square().sum()``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import Method, RunContext, register


class _SquaredDistance(torch.autograd.Function):
    """sum_i ||p_i - r_i||^2 over lists of tensors; gradient 2 (p_i - r_i) (refs get no gradient)."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        params, refs = tensors[:n], tensors[n:]
        ctx.n = n
        ctx.save_for_backward(*params, *refs)
        diffs = torch._foreach_sub(params, refs)
        norms = torch._foreach_norm(diffs)
        return torch.stack(norms).square().sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        params, refs = saved[:ctx.n], saved[ctx.n:]
        diffs = torch._foreach_sub(params, refs)  # recomputed: saves a copy of the model in memory
        torch._foreach_mul_(diffs, 2.0 * grad)
        return (None, *diffs, *([None] * len(refs)))


def squared_distance(params: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||params_i - refs_i||^2`` (differentiable in ``params``; ``refs`` are constants)."""
    if len(params) != len(refs):
        raise ValueError(f"{len(params)} parameters but {len(refs)} reference tensors")
    if not params:
        return torch.zeros(())
    return _SquaredDistance.apply(len(params), *params, *[r.detach() for r in refs])


def squared_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||params_i||^2`` (a handful of head tensors: a plain loop)."""
    total = torch.zeros((), device=params[0].device) if params else torch.zeros(())
    for p in params:
        total = total + p.square().sum()
    return total


def l2sp_terms(backbone: Sequence[torch.Tensor], pretrained: Sequence[torch.Tensor],
               head: Sequence[torch.Tensor], alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """The two L2-SP terms: ``alpha/2 ||w - w0||^2`` (backbone) and ``beta/2 ||w_head||^2``."""
    return {"l2sp": 0.5 * alpha * squared_distance(backbone, pretrained),
            "l2sp_head": 0.5 * beta * squared_norm(head)}


def head_params(head: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Trainable parameters of the head modules (deduplicated, in order)."""
    return list(dict.fromkeys(p for m in head for p in m.parameters() if p.requires_grad))


def backbone_and_refs(model: nn.Module, head: Sequence[nn.Module],
                      state: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(trainable backbone params, their pretrained values taken from ``state``)."""
    head_ids = {id(p) for m in head for p in m.parameters()}
    params, refs = [], []
    for name, p in model.named_parameters():
        if id(p) in head_ids or not p.requires_grad:
            continue
        if name not in state:
            raise KeyError(f"L2-SP: parameter {name!r} has no pretrained value in the reference state")
        ref = state[name].detach().to(device=p.device, dtype=p.dtype)
        if ref.shape != p.shape:
            raise ValueError(f"L2-SP: {name} has shape {tuple(p.shape)} but its pretrained value "
                             f"{tuple(ref.shape)}")
        params.append(p)
        refs.append(ref)
    return params, refs


def disable_weight_decay(groups: list[dict], ctx: RunContext, who: str) -> list[dict]:
    """Set weight_decay=0 in every group; log when the run asked for some."""
    wd = ctx.config.get("weight_decay", 0.0)
    if wd or any(g.get("weight_decay", 0.0) for g in groups):
        ctx.log(f"{who}: --weight-decay {wd} is ignored ({who} replaces weight decay; set to 0 in every "
                f"parameter group)")
    for g in groups:
        g["weight_decay"] = 0.0
    return groups


@register("l2sp")
@dataclass
class L2SP(Method):
    """L2-SP: alpha/2 ||w - w0||^2 on the backbone + beta/2 ||w_head||^2, no weight decay."""

    alpha: float = 0.01   # pull towards the pretrained backbone (official RIFLE harness)
    beta: float = 1e-4    # L2 on the new head (official RIFLE harness)

    kind = "reg"
    option_help = {"alpha": "weight of alpha/2 ||w - w0||^2 on the backbone (official RIFLE harness: 0.01)",
                   "beta": "weight of beta/2 ||w_head||^2 on the new head (official RIFLE harness: 1e-4)"}

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"l2sp alpha and beta must be >= 0, got {self.alpha}, {self.beta}")
        self._backbone: list[torch.Tensor] = []
        self._refs: list[torch.Tensor] = []
        self._head_modules: list[nn.Module] = []

    def configure_param_groups(self, groups: list[dict], ctx: RunContext) -> list[dict]:
        return disable_weight_decay(groups, ctx, "l2sp")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        state = ctx.pretrained_state if ctx.pretrained_state is not None else model.state_dict()
        self._backbone, self._refs = backbone_and_refs(model, ctx.head, state)
        self._head_modules = list(ctx.head)
        n = sum(p.numel() for p in self._backbone)
        ctx.log(f"L2-SP: alpha={self.alpha} on {len(self._backbone)} backbone tensors ({n} weights), "
                f"beta={self.beta} on the head {ctx.head_names}")

    def loss_terms(self, logits: torch.Tensor, features: torch.Tensor | None, x: torch.Tensor,
                   y: torch.Tensor) -> dict[str, torch.Tensor]:
        # head parameters are gathered each step: robust to tricks that re-parametrise the head
        return l2sp_terms(self._backbone, self._refs, head_params(self._head_modules), self.alpha,
                          self.beta)
