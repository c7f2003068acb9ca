"""Stochastic depth: drop whole residual branches, more often deeper (``--trick stochastic-depth``).

Paper: Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016,
arXiv 1603.09382. Residual block ``l = 1..L`` is dropped per example with probability
``(l / L) * (1 - p_L)`` (the paper's linear decay, §3; default ``p_L = 0.5``), the surviving branch scaled
by ``1 / p_l`` as timm's ``scale_by_keep``. The blocks are found by
:func:`rifle.core.structure.residual_blocks`; this file sets their rates. Decisions and supported
models: docs/methods.md "stochastic-depth".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from dataclasses import dataclass

import torch
from torch import nn

from ..core.rifle import unwrap_model
from ..core.structure import DropSite, residual_blocks
from .base import Method, RunContext, register


def drop_rates(num_blocks: int, p_l: float) -> list[float]:
    """Drop probability of residual blocks ``l = 1..L``: ``(l / L) * (1 - p_L)`` (Huang et al. §3)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0.0 < p_l <= 1.0:
        raise ValueError(f"stochastic-depth p_l (survival of the last block) must be in (0, 1], got {p_l}")
    return [(i / num_blocks) * (1.0 - p_l) for i in range(1, num_blocks + 1)]


def _drop_branch_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a residual branch's last layer (reads its rate from the module: copy-safe)."""
    from timm.layers import drop_path

    return drop_path(output, cast(float, module.stochastic_depth_drop), module.training)


def _setter_slot(block: nn.Module, attr: str) -> Callable[[float], float]:
    def apply(rate: float) -> float:
        from timm.layers import DropPath

        slot = getattr(block, attr)
        before = float(getattr(slot, "drop_prob", 0.0) or 0.0)
        if hasattr(slot, "drop_prob"):
            slot.drop_prob = rate
        else:  # nn.Identity / None: a parameter-free DropPath takes its place
            setattr(block, attr, DropPath(rate).train(block.training))
        return before

    return apply


def _setter_torchvision_block(bn: Any) -> Callable[[float], float]:  # an nn.Module given a plain attribute
    def apply(rate: float) -> float:
        before = getattr(bn, "stochastic_depth_drop", None)
        if before is None:
            bn.register_forward_hook(_drop_branch_output)
        bn.stochastic_depth_drop = rate
        return float(before or 0.0)

    return apply


def _setter_tv_sd(sd: Any) -> Callable[[float], float]:  # torchvision's StochasticDepth
    def apply(rate: float) -> float:
        before, sd.p = float(sd.p), rate
        return before

    return apply


_SETTERS: dict[str, Callable[[DropSite], Callable[[float], float]]] = {
    "slot": lambda site: _setter_slot(site.module, site.attr),
    "branch_end": lambda site: _setter_torchvision_block(site.module),
    "stochastic_depth": lambda site: _setter_tv_sd(site.module),
}


def block_setters(model: nn.Module) -> list[tuple[str, list[Callable[[float], float]]]]:
    """``[(block name, [setters])]`` in depth order; a setter applies a drop rate, returns the old one."""
    return [
        (name, [_SETTERS[site.kind](site) for site in sites])
        for name, sites in residual_blocks(unwrap_model(model))
    ]


@register("stochastic-depth")
@dataclass
class StochasticDepthTrick(Method):
    """Stochastic depth: residual block l of L dropped with probability l/L*(1-p_l) in training."""

    p_l: float = 0.5  # survival probability of the last residual block (paper: 0.5)

    kind = "trick"
    option_help = {"p_l": "survival probability of the last residual block (Huang et al.: 0.5)"}

    def __post_init__(self) -> None:
        drop_rates(1, self.p_l)  # validate
        self.rates: dict[str, float] = {}

    def apply(self, model: nn.Module, log: Callable[[str], None] = print) -> dict[str, float]:
        """Set the per-block rates on ``model``; returns ``{block name: drop probability}``."""
        blocks = block_setters(model)
        if not blocks:
            raise ValueError(
                f"stochastic-depth: {type(unwrap_model(model)).__name__} has no residual block this trick "
                f"can drop. Supported: tiny_cnn, efficientnet_lite0 and timm models with drop-path slots "
                f"(EfficientNet, ResNet, ConvNeXt, ViT, ...), torchvision ResNets, and torchvision models "
                f"with StochasticDepth layers"
            )
        rates = drop_rates(len(blocks), self.p_l)
        replaced = []
        for (name, setters), rate in zip(blocks, rates):
            for s in setters:
                before = s(rate)
                if before not in (0.0, rate):
                    replaced.append(f"{name}: {before:g}")
        if replaced:
            log(f"stochastic-depth: replaced the model's own drop rates ({', '.join(replaced)})")
        self.rates = {name: rate for (name, _), rate in zip(blocks, rates)}
        return self.rates

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        rates = self.apply(model, ctx.log)
        ctx.log(
            f"stochastic-depth: {len(rates)} residual blocks, survival 1 -> {self.p_l} "
            f"(first block drop {rates[next(iter(rates))]:.3f}, last {1 - self.p_l:.3f})"
        )
