"""DELTA: keep the fine-tuned network's feature maps close to the pretrained network's, channel-weighted.

Paper: Li, Xiong, Wang, Rao, Liu, Chen, Huan, "DELTA: DEep Learning Transfer using Feature Map with
Attention for Convolutional Networks", ICLR 2019, arXiv 1901.09229. Regulariser::

    Omega = alpha * sum_l (C_l / (H_l W_l)) * sum_c a_{l,c} * R_b( ||F_{l,c}(w, x_b) - F_{l,c}(w0, x_b)||^2 )
          + beta / 2 * ||w_head||^2

Follows the authors' code (github.com/lixingjian/DELTA) and TLlib for the scale and the defaults
(``alpha = beta = 0.01``, temperature 5, REFERENCE.md §4). Parts: the layers
(:func:`rifle.core.structure.resolve_layers`), the feature taps and the frozen copy
(:mod:`._feature_taps`), the channel attention (:mod:`._channel_attention`), the method (this file).
Every decision, and the measurements behind it: docs/methods.md "delta".
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.rifle import unwrap_model
from ..core.structure import head_params, resolve_layers
from ._channel_attention import (
    all_reduce_mean,
    attention_from_scores,
    exact_scores,
    first_order_scores,
    fit_probe,
)
from ._feature_taps import FeatureTap, StopForward, frozen_copy
from ._penalties import backbone_and_refs, disable_weight_decay, squared_distance, squared_norm
from .base import Method, RunContext, register

ATTENTION_MODES = ("first_order", "exact", "uniform")
HEAD_MODES = ("probe", "pretrained")
REDUCTIONS = ("sum", "mean")
FROZEN_BN = ("eval", "batch")
DRIFT_WARN = 0.5  # relative distance of the backbone from the pretrained weights after the first epoch


def feature_map_distance(
    features: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    attention: dict[str, torch.Tensor],
    scale: float | None = None,
) -> torch.Tensor:
    """``sum_l C_l/(H_l W_l) sum_c a_{l,c} * s * mean_b ||F_{l,b,c} - F0_{l,b,c}||^2``.

    ``s = scale`` (default ``B/2`` with B the batch here: the authors' ``1/2 sum over the batch``).
    """
    total: torch.Tensor | None = None
    for name, att in attention.items():
        f, f0 = features[name], reference[name].detach()
        b, c, h, w = f.shape
        sq = (f.float() - f0.float()).square().sum(dim=(2, 3))  # (B, C)
        per_channel = sq.mean(dim=0)  # (C,)
        s = b / 2.0 if scale is None else scale
        term = (att.to(per_channel) * per_channel).sum() * (s * c / (h * w))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no DELTA layers")
    return total


def backbone_drift(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``sqrt(sum ||W - W0||^2 / sum ||W0||^2)`` over ``(current, pretrained)`` pairs (L2-SP's distance)."""
    pairs = list(pairs)
    params, refs = [w for w, _ in pairs], [w0 for _, w0 in pairs]
    with torch.no_grad():
        den = float(squared_norm(refs))
        return (float(squared_distance(params, refs)) / den) ** 0.5 if den > 0 else 0.0


@register("delta")
@dataclass
class DELTA(Method):
    """DELTA: attention-weighted distance to the pretrained model's feature maps + beta/2 ||w_head||^2."""

    alpha: float = 0.01  # feature-map term (authors' code, TLlib)
    beta: float = 0.01  # L2 on the head (authors' code, TLlib)
    layers: str | None = None  # comma-separated dotted module names; None = automatic
    attention: str = "first_order"  # "first_order" | "exact" | "uniform"
    attention_batches: int = 10  # training batches used for the attention (TLlib: up to 10)
    attention_head: str = "probe"  # "probe" (fit a linear probe first) | "pretrained"
    temperature: float = 5.0  # softmax temperature over z-scores (authors, TLlib)
    reduction: str = "sum"  # "sum" (1/2 sum over a --batch-size batch, authors) | "mean"
    frozen_bn: str = "eval"  # "eval" (pretrained running stats, authors) | "batch" (batch stats)

    kind = "reg"
    needs_pretrained = True
    option_help = {
        "alpha": "weight of the feature-map distance (authors/TLlib: 0.01)",
        "beta": "weight of beta/2 ||head||^2 (authors/TLlib: 0.01)",
        "layers": "comma-separated module names whose outputs are regularised (default: automatic)",
        "attention": "channel attention: first_order (fast), exact (channel ablation, slow) or uniform",
        "attention_batches": "training batches used to compute the attention",
        "attention_head": "probe: fit a linear head on frozen features first; pretrained: keep the head",
        "temperature": "softmax temperature over per-layer z-scored channel scores (5)",
        "reduction": "sum: 1/2 sum over a --batch-size batch (authors' scale); mean: 1/2 mean",
        "frozen_bn": "eval: the frozen model's BatchNorm uses its running stats (authors); batch: the "
        "batch's statistics, like the fine-tuned model in training",
    }

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"delta attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.attention_head not in HEAD_MODES:
            raise ValueError(f"delta attention_head must be one of {HEAD_MODES}, got {self.attention_head!r}")
        if self.frozen_bn not in FROZEN_BN:
            raise ValueError(f"delta frozen_bn must be one of {FROZEN_BN}, got {self.frozen_bn!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"delta reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.attention_batches < 1:
            raise ValueError(f"delta attention_batches must be >= 1, got {self.attention_batches}")
        if self.temperature <= 0 or self.alpha < 0 or self.beta < 0:
            raise ValueError("delta temperature must be > 0 and alpha, beta >= 0")
        self.frozen: nn.Module | None = None
        self.layer_names: list[str] = []
        self.channel_attention: dict[str, torch.Tensor] = {}
        self._pending: dict[str, Any] | None = None
        self._tap: FeatureTap | None = None
        self._ref_tap: FeatureTap | None = None
        self._head_modules: list[nn.Module] = []
        self._batch: int | None = None
        self._device = torch.device("cpu")
        self._drift_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._drift_checked = False

    # ------------------------------------------------------------------ hooks
    def configure_param_groups(self, groups: list[dict], ctx: RunContext) -> list[dict]:
        return disable_weight_decay(groups, ctx, "delta")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        inner = unwrap_model(model)
        self.layer_names = resolve_layers(inner, self.layers, ctx.head_names)
        for tap in (self._tap, self._ref_tap):  # setup twice never stacks hooks
            if tap is not None:
                tap.remove()
        self.frozen = frozen_copy(inner, ctx.pretrained_state, batch_stats=self.frozen_bn == "batch")
        self._head_modules = list(ctx.head)
        self._batch = ctx.config.get("batch_size")
        self._device = ctx.device
        pending, self._pending = self._pending, None
        if pending and list(pending.get("layers", [])) == self.layer_names:
            self.channel_attention = {k: v.to(ctx.device) for k, v in pending["attention"].items()}
            ctx.log(f"DELTA: channel attention restored from the checkpoint for {self.layer_names}")
        else:
            if pending:
                ctx.log(
                    f"DELTA: checkpoint attention is for {pending.get('layers')}, not "
                    f"{self.layer_names}: recomputing"
                )
            self.channel_attention = self._compute_attention(ctx)
        self._tap = FeatureTap(inner, self.layer_names, grad_only=True)
        self._ref_tap = FeatureTap(self.frozen, self.layer_names, stop=True)
        # conv / linear weights only (as in the depth analysis): BatchNorm's affine parameters would
        # dominate the norm and hide the drift
        self._drift_pairs = (
            [
                (p, r)
                for p, r in zip(*backbone_and_refs(inner, self._head_modules, ctx.pretrained_state))
                if p.dim() > 1
            ]
            if ctx.pretrained_state is not None
            else []
        )
        self._drift_checked = False

    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        """After the first epoch of this process: warn when the backbone already drifted far from the
        pretrained weights - DELTA is dominating training instead of anchoring it (alpha too large for
        this model, resolution or data)."""
        if epoch < 1 or self._drift_checked or not self._drift_pairs:
            return {}
        self._drift_checked = True
        drift = backbone_drift(self._drift_pairs)
        if drift > DRIFT_WARN:
            warnings.warn(
                f"DELTA: after epoch {epoch - 1} the backbone weights are {drift:.2f} (relative, "
                f"||W - W0|| / ||W0||) away from the pretrained ones - plain fine-tuning moves them a few "
                f"percent; DELTA is meant to keep them close. Its term dominates training at alpha="
                f"{self.alpha:g} here (its default was set for ResNets at 224 px). "
                f"Use a smaller --delta-alpha (EfficientNet-Lite0 / ELPV at 112 px, relative change of the "
                f"first third of the backbone after 10 epochs: alpha 0.01 -> 2.2, 0.001 -> 0.23, "
                f"0.0001 -> 0.066, plain fine-tuning 0.05; "
                f"docs/results/elpv.md).",
                stacklevel=2,
            )
        return {}

    def _batches(self, ctx: RunContext, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if ctx.train_loader is None:
            raise ValueError("DELTA needs training batches (ctx.train_loader) to compute channel attention")
        out = []
        for x, y in itertools.islice(ctx.train_loader(), n):
            out.append((x.to(ctx.device), y.to(ctx.device)))
        if not out:
            raise ValueError("DELTA: the training loader gave no batch")
        return out

    def _compute_attention(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        assert self.frozen is not None
        t0 = time.perf_counter()
        n = 1 if self.attention == "uniform" else self.attention_batches
        batches = self._batches(ctx, n)
        tap = FeatureTap(self.frozen, self.layer_names)
        with torch.no_grad():
            self.frozen(batches[0][0])
        shapes = {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            for k, v in tap.outputs.items()
        }
        tap.remove()
        for name, shape in shapes.items():
            if not isinstance(shape, tuple) or len(shape) != 4:
                raise ValueError(
                    f"DELTA needs convolutional feature maps (B, C, H, W); layer {name!r} "
                    f"outputs {shape}: choose other --delta-layers"
                )
        if self.attention == "uniform":
            att = {k: torch.full((s[1],), 1.0 / s[1], device=ctx.device) for k, s in shapes.items()}
            ctx.log(f"DELTA: uniform channel attention on {self.layer_names}")
            return att
        probe = ""
        if self.attention_head == "probe":
            heads = [self.frozen.get_submodule(h) for h in ctx.head_names] if len(ctx.head_names) == 1 else []
            acc = fit_probe(self.frozen, heads[0], batches) if heads else None
            probe = (
                f", linear probe fitted on {sum(len(y) for _, y in batches)} images (train acc {acc:.3f})"
                if acc is not None
                else ", no probe (head output is not the logits): pretrained head used"
            )
        scorer = first_order_scores if self.attention == "first_order" else exact_scores
        scores = all_reduce_mean(scorer(self.frozen, self.layer_names, batches), ctx.device)
        att = {k: attention_from_scores(v, self.temperature).to(ctx.device) for k, v in scores.items()}
        spread = ", ".join(
            f"{k}: {len(a)} ch, max/min {float(a.max() / a.min()):.2f}" for k, a in att.items()
        )
        ctx.log(
            f"DELTA: {self.attention} channel attention from {len(batches)} batch(es){probe} in "
            f"{time.perf_counter() - t0:.1f} s [{spread}]"
        )
        return att

    def loss_terms(
        self, logits: torch.Tensor, features: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        assert self.frozen is not None and self._tap is not None and self._ref_tap is not None, (
            "setup() first"
        )
        feats = self._tap.take()
        self._ref_tap.outputs.clear()
        with torch.no_grad():
            try:
                self.frozen(x)
            except StopForward:
                pass
        ref = self._ref_tap.take()
        if self.reduction == "sum":
            scale = (self._batch or len(y)) / 2.0
        else:
            scale = 0.5
        dist = feature_map_distance(feats, ref, self.channel_attention, scale=scale)
        return {
            "delta": self.alpha * dist,
            "delta_head": 0.5 * self.beta * squared_norm(head_params(self._head_modules)),
        }

    def state_dict(self) -> dict[str, Any]:
        if not self.channel_attention:
            return {}
        return {
            "layers": list(self.layer_names),
            "attention": {k: v.detach().cpu() for k, v in self.channel_attention.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.frozen is None:  # before setup (the trainer restores, then calls setup)
            self._pending = state
            return
        if list(state.get("layers", [])) != self.layer_names:
            raise ValueError(
                f"DELTA state is for layers {state.get('layers')}, this run uses {self.layer_names}"
            )
        self.channel_attention = {k: v.to(self._device) for k, v in state["attention"].items()}
