"""Stochastic depth: drop whole residual branches, more often deeper (``--trick stochastic-depth``).

Paper: Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016
(arXiv 1603.09382). Rule (§3, linear decay): residual block ``l = 1..L`` keeps its branch with survival
probability ``p_l = 1 - (l / L) * (1 - p_L)`` (the input, ``l = 0``, always survives), i.e. block ``l``
is dropped with probability ``(l / L) * (1 - p_L)``; the Bernoulli draw is per example and per step
(``H_l = ReLU(b_l f_l(H_{l-1}) + id(H_{l-1}))``). Default ``p_L = 0.5``, the paper's choice.

Project decisions:

* ``L`` counts the residual blocks that *can* be dropped (blocks without an identity path - timm
  EfficientNet's ``has_skip=False``, torchvision's ``use_res_connect=False`` - are skipped), in module
  order. This is the paper's ``l / L`` rule, not timm's ``linspace(0, rate, L)`` (first block never
  dropped) nor torchvision's ``rate * i / L`` (0-based ``i``).
* scaling: the surviving branch is scaled by ``1 / p_l`` at training time (timm's ``scale_by_keep``)
  instead of scaling by ``p_l`` at test time as the paper does. In expectation the same; evaluation is
  then the unmodified network - necessary when fine-tuning a backbone pretrained without stochastic
  depth - and deterministic.
* no model option is used (``model_kwargs`` stays empty: it cannot see the model); ``setup`` sets the
  rates on the built model. Supported: blocks with timm-style drop-path slots ``drop_path`` /
  ``drop_path1`` / ``drop_path2`` (``tiny_cnn``, ``efficientnet_lite0`` and timm EfficientNets,
  ResNets, ConvNeXt, ViT, ...: an ``Identity`` / ``None`` slot becomes a ``DropPath``, an existing
  ``DropPath`` gets its ``drop_prob`` set); torchvision ``ResNet`` ``BasicBlock`` / ``Bottleneck``
  (a forward hook on the branch's last BatchNorm applies the drop, rate stored in its
  ``stochastic_depth_drop`` attribute); torchvision models with ``StochasticDepth`` layers (their ``p``
  is overwritten). None of these adds parameters, so the optimizer is unaffected. Any other model:
  ``ValueError``.

Randomness: the global torch RNG, seeded per epoch by the trainer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.rifle import unwrap_model
from .base import Method, RunContext, register

SLOTS = ("drop_path", "drop_path1", "drop_path2")


def drop_rates(num_blocks: int, p_l: float) -> list[float]:
    """Drop probability of residual blocks ``l = 1..L``: ``(l / L) * (1 - p_L)`` (Huang et al. §3)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0.0 < p_l <= 1.0:
        raise ValueError(f"stochastic-depth p_l (survival of the last block) must be in (0, 1], got {p_l}")
    return [(l / num_blocks) * (1.0 - p_l) for l in range(1, num_blocks + 1)]


def _drop_branch_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on a residual branch's last layer (reads its rate from the module: copy-safe)."""
    from timm.layers import drop_path
    return drop_path(output, module.stochastic_depth_drop, module.training)


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


def _setter_torchvision_block(bn: nn.Module) -> Callable[[float], float]:
    def apply(rate: float) -> float:
        before = getattr(bn, "stochastic_depth_drop", None)
        if before is None:
            bn.register_forward_hook(_drop_branch_output)
        bn.stochastic_depth_drop = rate
        return float(before or 0.0)
    return apply


def _setter_tv_sd(sd: nn.Module) -> Callable[[float], float]:
    def apply(rate: float) -> float:
        before, sd.p = float(sd.p), rate
        return before
    return apply


def residual_blocks(model: nn.Module) -> list[tuple[str, list[Callable[[float], float]]]]:
    """``[(block name, [setters])]`` in depth order; a setter applies a drop rate, returns the old one."""
    from timm.layers import DropPath
    from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck
    from torchvision.ops import StochasticDepth

    try:
        from timm.models.resnet import BasicBlock as TimmBasic, Bottleneck as TimmBottleneck
        timm_resnet: tuple[type, ...] = (TimmBasic, TimmBottleneck)
    except ImportError:  # pragma: no cover - timm layout change
        timm_resnet = ()
    model = unwrap_model(model)
    blocks: dict[str, list[Callable[[float], float]]] = {}
    for name, m in model.named_modules():
        if getattr(m, "has_skip", True) is False or getattr(m, "use_res_connect", True) is False:
            continue  # no identity path: the branch cannot be dropped
        if isinstance(m, (TvBasic, TvBottleneck)):
            blocks[name] = [_setter_torchvision_block(m.bn3 if isinstance(m, TvBottleneck) else m.bn2)]
            continue
        for attr in SLOTS:
            slot = getattr(m, attr, "absent")
            if (isinstance(slot, (DropPath, nn.Identity))
                    or (slot is None and timm_resnet and isinstance(m, timm_resnet))):
                blocks.setdefault(name, []).append(_setter_slot(m, attr))
        for child_name, child in m.named_children():
            if isinstance(child, StochasticDepth):
                blocks.setdefault(name, []).append(_setter_tv_sd(child))
    return list(blocks.items())


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
        blocks = residual_blocks(model)
        if not blocks:
            raise ValueError(
                f"stochastic-depth: {type(unwrap_model(model)).__name__} has no residual block this trick "
                f"can drop. Supported: tiny_cnn, efficientnet_lite0 and timm models with drop-path slots "
                f"(EfficientNet, ResNet, ConvNeXt, ViT, ...), torchvision ResNets, and torchvision models "
                f"with StochasticDepth layers")
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
        ctx.log(f"stochastic-depth: {len(rates)} residual blocks, survival 1 -> {self.p_l} "
                f"(first block drop {rates[next(iter(rates))]:.3f}, last {1 - self.p_l:.3f})")
