"""Parameter utilities of the regularisers that replace weight decay (L2-SP and DELTA).

The squared distance to the pretrained weights as one fused ``torch._foreach_*`` pass (L2-SP's
``||w - w0||^2``, after Li, Grandvalet, Davoine, ICML 2018, arXiv 1802.01483), the plain squared norm of
the head, the backbone parameters paired with their pretrained values, and switching weight decay off.
Not a method: support code (the ``_`` keeps it out of the registry's import of method modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import RunContext


class _SquaredDistance(torch.autograd.Function):
    """sum_i ||p_i - r_i||^2 over lists of tensors; gradient 2 (p_i - r_i) (refs get no gradient)."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        params, refs = tensors[:n], tensors[n:]
        ctx.n = n
        ctx.save_for_backward(*params, *refs)
        diffs = torch._foreach_sub(params, refs)
        norms = torch._foreach_norm(diffs)
        return torch.stack(norms).square().sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        saved = ctx.saved_tensors
        params, refs = saved[: ctx.n], saved[ctx.n :]
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


def backbone_and_refs(
    model: nn.Module, head: Sequence[nn.Module], state: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(trainable backbone params, their pretrained values taken from ``state``)."""
    head_ids = {id(p) for m in head for p in m.parameters()}
    params: list[torch.Tensor] = []
    refs: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if id(p) in head_ids or not p.requires_grad:
            continue
        if name not in state:
            raise KeyError(f"L2-SP: parameter {name!r} has no pretrained value in the reference state")
        ref = state[name].detach().to(device=p.device, dtype=p.dtype)
        if ref.shape != p.shape:
            raise ValueError(
                f"L2-SP: {name} has shape {tuple(p.shape)} but its pretrained value {tuple(ref.shape)}"
            )
        params.append(p)
        refs.append(ref)
    return params, refs


def disable_weight_decay(groups: list[dict], ctx: RunContext, who: str) -> list[dict]:
    """Set weight_decay=0 in every group; log when the run asked for some (when ``ctx.config`` says which
    keys the user gave, ``_given``: only when --weight-decay was one of them)."""
    wd = ctx.config.get("weight_decay", 0.0)
    given = ctx.config.get("_given")
    if (wd or any(g.get("weight_decay", 0.0) for g in groups)) and (given is None or "weight_decay" in given):
        ctx.log(
            f"{who}: --weight-decay {wd} is ignored ({who} replaces weight decay; set to 0 in every "
            f"parameter group)"
        )
    for g in groups:
        g["weight_decay"] = 0.0
    return groups
