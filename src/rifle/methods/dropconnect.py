"""DropConnect on the classifier head's weights (``--trick dropconnect``).

Paper: Wan, Zeiler, Zhang, LeCun, Fergus, "Regularization of Neural Networks using DropConnect",
ICML 2013 (PMLR 28). During training the head computes ``r = ((M * W) v) / (1 - p) + b`` with a Bernoulli
mask ``M`` on the **weights**, drawn per example (the paper's Algorithm 1); the plain head in evaluation.
Not drop-path (timm's ``--drop-connect`` is stochastic depth). Default ``p = 0.5`` (the paper's
experiments). Decisions (inference, bias, per-example masks, the hook) and costs: docs/methods.md
"dropconnect".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, RunContext, register


def _check_p(p: float) -> None:
    """``ValueError`` unless ``p`` is a drop probability in ``[0, 1)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropconnect p must be in [0, 1), got {p}")


def _keep_mask(
    shape: tuple[int, ...], keep: float, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """A 0 / ``1/keep`` mask of ``shape`` (each entry kept with probability ``keep``)."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device)
    return ((u < keep).to(like.dtype) / keep).to(like.device)


def dropconnect_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    p: float,
    training: bool,
    generator: torch.Generator | None = None,
    *,
    per_sample: bool = True,
    mask_bias: bool = False,
) -> torch.Tensor:
    """``F.linear`` with DropConnect: each weight dropped with probability ``p``, kept ones scaled by
    ``1/(1-p)``; the plain ``F.linear(x, weight, bias)`` when not training or ``p == 0``.

    ``x`` is ``[B, D]`` (``[..., D]`` allowed with ``per_sample=False``), ``weight`` ``[C, D]``.
    """
    _check_p(p)
    if not training or p == 0.0:
        return F.linear(x, weight, bias)
    keep = 1.0 - p
    if not per_sample:
        b = (
            bias * _keep_mask(tuple(bias.shape), keep, bias, generator)
            if bias is not None and mask_bias
            else bias
        )
        return F.linear(x, weight * _keep_mask(tuple(weight.shape), keep, weight, generator), b)
    if x.dim() != 2:
        raise ValueError(
            f"dropconnect per_sample=True needs a [batch, features] input, got shape "
            f"{tuple(x.shape)}; use per_sample=False"
        )
    n = x.shape[0]
    w = weight.unsqueeze(0) * _keep_mask((n, *weight.shape), keep, weight, generator)  # [B, C, D]
    out = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        out = out + (bias * _keep_mask((n, *bias.shape), keep, bias, generator) if mask_bias else bias)
    return out


def _forward_hook(p: float, per_sample: bool, mask_bias: bool):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None  # evaluation: the plain head
        weight, bias = cast(torch.Tensor, module.weight), cast("torch.Tensor | None", module.bias)
        return dropconnect_linear(args[0], weight, bias, p, True, per_sample=per_sample, mask_bias=mask_bias)

    return hook


@register("dropconnect")
@dataclass
class DropConnect(Method):
    """DropConnect: a Bernoulli mask on the head's weights at training time (not drop-path)."""

    p: float = 0.5
    per_sample: bool = True  # a mask per example (the paper); False: one mask per mini-batch
    mask_bias: bool = False  # the paper masks the bias too

    kind = "trick"
    option_help = {
        "p": "drop probability of each head weight (Wan et al.: 0.5)",
        "per_sample": "a mask per example (the paper) instead of one per mini-batch",
        "mask_bias": "mask the head's bias too (the paper does)",
    }

    def __post_init__(self) -> None:
        _check_p(self.p)
        self._handles: list = []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        for name, m in zip(ctx.head_names, ctx.head):
            if not isinstance(m, nn.Linear):
                raise ValueError(f"dropconnect needs nn.Linear head(s); {name} is a {type(m).__name__}")
        for h in self._handles:
            h.remove()
        self._handles = [
            m.register_forward_hook(_forward_hook(self.p, self.per_sample, self.mask_bias)) for m in ctx.head
        ]
        ctx.log(
            f"dropconnect: p={self.p} on the weights of {', '.join(ctx.head_names)} "
            f"({'a mask per example' if self.per_sample else 'one mask per batch'})"
        )
