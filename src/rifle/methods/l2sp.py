"""L2-SP: weight decay towards the pretrained weights (the "starting point") instead of towards zero.

Paper: Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks", ICML 2018, arXiv 1802.01483. Regulariser ``alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_head||^2``
on the backbone's trainable parameters and the new head, no weight decay on top; defaults
``alpha = 0.01``, ``beta = 1e-4`` from the official RIFLE harness (REFERENCE.md §2). Decisions where the
paper is vague, and the cost: docs/methods.md "l2sp".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.structure import head_params
from ._penalties import backbone_and_refs, disable_weight_decay, squared_distance, squared_norm
from .base import Method, RunContext, register


def l2sp_terms(
    backbone: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    head: Sequence[torch.Tensor],
    alpha: float,
    beta: float,
) -> dict[str, torch.Tensor]:
    """The two L2-SP terms: ``alpha/2 ||w - w0||^2`` (backbone) and ``beta/2 ||w_head||^2``."""
    return {
        "l2sp": 0.5 * alpha * squared_distance(backbone, pretrained),
        "l2sp_head": 0.5 * beta * squared_norm(head),
    }


@register("l2sp")
@dataclass
class L2SP(Method):
    """L2-SP: alpha/2 ||w - w0||^2 on the backbone + beta/2 ||w_head||^2, no weight decay."""

    alpha: float = 0.01  # pull towards the pretrained backbone (official RIFLE harness)
    beta: float = 1e-4  # L2 on the new head (official RIFLE harness)

    kind = "reg"
    needs_pretrained = True
    option_help = {
        "alpha": "weight of alpha/2 ||w - w0||^2 on the backbone (official RIFLE harness: 0.01)",
        "beta": "weight of beta/2 ||w_head||^2 on the new head (official RIFLE harness: 1e-4)",
    }

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
        ctx.log(
            f"L2-SP: alpha={self.alpha} on {len(self._backbone)} backbone tensors ({n} weights), "
            f"beta={self.beta} on the head {ctx.head_names}"
        )

    def loss_terms(
        self, logits: torch.Tensor, features: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # head parameters are gathered each step: robust to tricks that re-parametrise the head
        return l2sp_terms(self._backbone, self._refs, head_params(self._head_modules), self.alpha, self.beta)
