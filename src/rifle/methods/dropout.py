"""Dropout on the pooled feature, before the classifier head (``--trick dropout``).

Paper: Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov, "Dropout: A Simple Way to Prevent
Neural Networks from Overfitting", JMLR 15 (2014) 1929-1958. Rule: during training every element of the
head's input ``h`` is zeroed with probability ``p`` and the kept ones are scaled by ``1/(1-p)``
("inverted" dropout, so the evaluation network is the unmodified one - the paper's weight scaling at
test time, moved to training time); identity in evaluation.

Default ``p = 0.5``: the paper's retention probability 0.5 for hidden units ("close to optimal for a
wide range of networks and tasks", §1; the paper's p is the *retention* probability, ours the drop
probability - at 0.5 they coincide); the pooled feature is the last hidden layer. RIFLE
(ICML 2020) compares against dropout "before the FC" without stating the rate (REFERENCE.md §4).

Project decisions: implemented as a forward pre-hook on the head module(s) (``ctx.head``) - no module
is replaced, so the optimizer, DDP and RIFLE's in-place re-init keep their references (REFERENCE.md
§5). Randomness comes from the global torch RNG, which the trainer seeds per epoch (resume-exact).
Features captured for regularisers (``needs_features``) are taken *before* the dropout: the trainer's
capture hook is registered before methods' ``setup``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, RunContext, register


def feature_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale kept ones by ``1/(1-p)``."""
    return F.dropout(x, p=p, training=training)


def _pre_hook(p: float):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (feature_dropout(args[0], p, module.training), *args[1:])
    return hook


@register("dropout")
@dataclass
class Dropout(Method):
    """Dropout with probability p on the head's input (the pooled feature), training only."""

    p: float = 0.5

    kind = "trick"
    option_help = {"p": "drop probability of each pooled-feature element (Srivastava et al.: 0.5)"}

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {self.p}")
        self._handles: list = []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        for h in self._handles:  # setup twice (e.g. a second fit) never stacks two dropouts
            h.remove()
        self._handles = [m.register_forward_pre_hook(_pre_hook(self.p)) for m in ctx.head]
        ctx.log(f"dropout: p={self.p} on the input of {', '.join(ctx.head_names)}")
