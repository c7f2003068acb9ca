"""Dropout on the pooled feature, before the classifier head (``--trick dropout``).

Paper: Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov, "Dropout: A Simple Way to Prevent
Neural Networks from Overfitting", JMLR 15 (2014) 1929-1958. During training every element of the head's
input is zeroed with probability ``p`` and the kept ones are scaled by ``1/(1-p)`` (inverted dropout);
identity in evaluation. Default ``p = 0.5`` (the paper, §1). A forward pre-hook on the head: no module is
replaced. Decisions: docs/methods.md "dropout".
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
