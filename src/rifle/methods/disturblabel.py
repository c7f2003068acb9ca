"""DisturbLabel: replace a random fraction of training labels (``--trick disturblabel``).

Paper: Xie, Wang, Wei, Wang, Tian, "DisturbLabel: Regularizing CNN on the Loss Layer", CVPR 2016
(arXiv 1605.00055). Rule: in every mini-batch each training label ``c`` is, with probability ``alpha``
(the noise rate), replaced by a label drawn uniformly over **all** ``C`` classes - so it may be redrawn
as itself: the new label is ``c`` with probability ``1 - alpha (C-1)/C`` and each other class with
``alpha / C``; the expected change rate is ``alpha (C-1)/C``.

Default ``alpha = 0.1``: the paper finds small noise rates (10-20 %) work best; we take the lower end,
since a fine-tuning set with few images per class has little label redundancy to spare.

Project decisions: applied in ``transform_batch``, which the trainer calls in training only
(evaluation never sees disturbed labels). The reported ``train_acc`` / ``train_loss`` are measured
against the disturbed labels. Randomness: the global torch RNG (seeded per epoch by the trainer) or an
explicit ``generator``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Method, RunContext, register


def disturb_labels(y: torch.Tensor, num_classes: int, alpha: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability ``alpha`` replace each label by one drawn uniformly over ``num_classes``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"disturblabel alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0 or y.numel() == 0:
        return y
    device = generator.device if generator is not None else y.device
    pick = torch.rand(y.shape, generator=generator, device=device) < alpha
    new = torch.randint(0, num_classes, y.shape, generator=generator, device=device)
    return torch.where(pick.to(y.device), new.to(device=y.device, dtype=y.dtype), y)


@register("disturblabel")
@dataclass
class DisturbLabel(Method):
    """DisturbLabel: each training label replaced, with rate alpha, by a uniformly drawn class."""

    alpha: float = 0.1

    kind = "trick"
    option_help = {"alpha": "noise rate: share of labels redrawn uniformly over all classes (paper: 0.1-0.2)"}

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"disturblabel alpha must be in [0, 1], got {self.alpha}")
        self.num_classes: int | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        self.num_classes = ctx.num_classes
        c = ctx.num_classes
        ctx.log(f"disturblabel: alpha={self.alpha} over {c} classes "
                f"(expected change rate {self.alpha * (c - 1) / c:.3f})")

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_classes is None:
            raise RuntimeError("disturblabel: setup() first")
        return x, disturb_labels(y, self.num_classes, self.alpha)
