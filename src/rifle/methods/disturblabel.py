"""DisturbLabel: replace a random fraction of training labels (``--trick disturblabel``).

Paper: Xie, Wang, Wei, Wang, Tian, "DisturbLabel: Regularizing CNN on the Loss Layer", CVPR 2016,
arXiv 1605.00055. In every training mini-batch each label is, with probability ``alpha``, replaced by a
label drawn uniformly over **all** ``C`` classes (so it may be redrawn as itself). Default
``alpha = 0.1``. Decisions: docs/methods.md "disturblabel".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Method, RunContext, register


def _check_alpha(alpha: float) -> None:
    """``ValueError`` unless ``alpha`` is a noise rate in ``[0, 1]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"disturblabel alpha must be in [0, 1], got {alpha}")


def disturb_labels(
    y: torch.Tensor, num_classes: int, alpha: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """With probability ``alpha`` replace each label by one drawn uniformly over ``num_classes``."""
    _check_alpha(alpha)
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
        _check_alpha(self.alpha)
        self.num_classes: int | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        self.num_classes = ctx.num_classes
        c = ctx.num_classes
        ctx.log(
            f"disturblabel: alpha={self.alpha} over {c} classes "
            f"(expected change rate {self.alpha * (c - 1) / c:.3f})"
        )

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_classes is None:
            raise RuntimeError("disturblabel: setup() first")
        return x, disturb_labels(y, self.num_classes, self.alpha)
