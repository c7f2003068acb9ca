"""Label smoothing: the training loss against ``(1 - eps) * one-hot + eps / C`` (``--label-smoothing EPS``).

Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, "Rethinking the Inception Architecture for Computer Vision",
CVPR 2016, arXiv 1512.00567 §7. The training loss becomes ``F.cross_entropy(logits, y,
label_smoothing=eps)``; validation and test losses stay the plain cross-entropy. Decisions:
docs/methods.md "label-smoothing".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, register


def _check_eps(eps: float) -> None:
    """``ValueError`` unless ``eps`` is in ``[0, 1)``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < 1.0:
        raise ValueError(f"--label-smoothing (label_smoothing) must be a number in [0, 1), got {eps!r}")


@register("label-smoothing")
@dataclass
class LabelSmoothing(Method):
    """Label smoothing: training cross-entropy against targets smoothed by eps (torch's semantics)."""

    eps: float = 0.1

    kind = "trick"
    option_help = {"eps": "smoothing epsilon in [0, 1); --label-smoothing EPS alone adds the trick"}

    def __post_init__(self) -> None:
        _check_eps(self.eps)

    def loss_terms(
        self, logits: torch.Tensor, features: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``smoothed CE - CE``: added to the trainer's cross-entropy, the loss is the smoothed one."""
        if not self.eps:
            return {}
        z = logits.float()
        return {"label_smoothing": F.cross_entropy(z, y, label_smoothing=self.eps) - F.cross_entropy(z, y)}
