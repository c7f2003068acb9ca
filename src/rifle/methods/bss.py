"""BSS: Batch Spectral Shrinkage - penalise the smallest singular values of the batch feature matrix.

Paper: Chen, Wang, Fu, Long, Wang, "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral
Shrinkage for Safe Transfer Learning", NeurIPS 2019. Regulariser ``eta * sum_{i=1..k} sigma_{-i}(F)^2``
over the head's input ``F`` (B x D), ``sigma_{-i}`` its i-th smallest singular value; defaults ``k = 1``,
``eta = 0.001`` (the paper; TLlib's example). Decisions where the paper is vague: docs/methods.md "bss".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, register


def bss_penalty(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """``sum of the squares of the k smallest singular values`` of ``features`` viewed as (B, -1).

    Never penalises the largest singular value (``k`` is clipped to ``min(B, D) - 1``).
    """
    f = features.reshape(features.shape[0], -1)
    if f.dtype not in (torch.float32, torch.float64):
        f = f.float()
    n = min(f.shape)
    k_eff = min(int(k), n - 1)
    if k_eff <= 0:
        return f.sum() * 0.0  # keeps the graph and the device
    s = torch.linalg.svdvals(f)  # descending
    return s[n - k_eff :].square().sum()


@register("bss")
@dataclass
class BSS(Method):
    """Batch Spectral Shrinkage: eta * sum of the k smallest squared singular values of the features."""

    k: int = 1  # number of smallest singular values penalised (paper, TLlib)
    eta: float = 0.001  # trade-off (paper, TLlib)

    kind = "reg"
    needs_features = True
    option_help = {
        "k": "number of smallest singular values of the batch features penalised (paper: 1)",
        "eta": "trade-off weight of the penalty (paper, TLlib: 0.001)",
    }

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"bss k must be >= 1, got {self.k}")
        if self.eta < 0:
            raise ValueError(f"bss eta must be >= 0, got {self.eta}")

    def loss_terms(
        self, logits: torch.Tensor, features: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if features is None:
            raise RuntimeError(
                "bss needs the head's input features, but none were captured "
                "(the trainer registers the capture hook when needs_features is True)"
            )
        return {"bss": self.eta * bss_penalty(features, self.k)}
