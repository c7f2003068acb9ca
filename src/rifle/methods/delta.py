"""DELTA: keep the fine-tuned network's feature maps close to the pretrained network's, channel-weighted.

Paper: Li, Xiong, Wang, Rao, Liu, Chen, Huan, "DELTA: DEep Learning Transfer using Feature Map with
Attention for Convolutional Networks", ICLR 2019, arXiv 1901.09229. Regulariser::

    Omega = alpha * sum_l (C_l / (H_l W_l)) * sum_c a_{l,c} * R_b( ||F_{l,c}(w, x_b) - F_{l,c}(w0, x_b)||^2 )
          + beta / 2 * ||w_head||^2

``F_l`` is the output of a chosen layer (B x C_l x H_l x W_l) of the fine-tuned model and of a frozen
copy of the pretrained model ``w0`` on the same input, ``a_{l,c}`` the channel attention (softmax over the
channels of layer l, so ``sum_c a = 1``; the factor ``C_l`` makes the mean weight 1) and ``R_b`` the
reduction over the batch: ``reduction="sum"`` (default) is ``1/2 * sum over a batch of --batch-size
samples`` - the normalisation of the authors' code (github.com/lixingjian/DELTA) and of TLlib, for which
their defaults ``alpha = beta = 0.01`` were set (REFERENCE.md §4). It is computed as ``B/2 * mean`` with
``B = --batch-size``, so it does not change with ``--grad-accum`` or the number of DDP ranks.
``reduction="mean"`` is ``1/2 * mean over the batch`` (use ``alpha * B`` for the same strength).

Channel attention (computed once in ``setup`` on the pretrained model, stored in ``state_dict``):

1. head: the pretrained model's head is the new, random one, so by default (``attention_head="probe"``)
   a linear probe is fitted on the frozen features of the attention batches themselves (L-BFGS, 50
   iterations, L2 1e-3) and used as the head of the frozen copy - a cheap stand-in for TLlib's "train a
   classifier on the frozen backbone for 10 epochs" (which uses the whole training set). ``"pretrained"``
   keeps the head of the pretrained state (the random new head, unless the checkpoint's head fits).
2. per channel, on the first ``attention_batches`` training batches (epoch-0 order and augmentation):
   ``"first_order"`` (default): the first-order (Taylor) estimate of the loss change when the channel is
   zeroed, in magnitude: ``|-sum_{b,h,w} F * dL/dF|`` (one forward + backward per batch, as in Taylor
   channel pruning, Molchanov et al. 2017); ``"exact"``: the channel is zeroed and the loss increase
   measured (signed: the authors'/TLlib procedure; one forward per channel per batch - hours for a
   ResNet-50 on CPU); ``"uniform"``: all channels equal (the paper's unweighted feature-map variant).
   Scores are averaged over batches (and over DDP ranks, so every replica uses the same attention).
   The magnitude was chosen by measurement: on EfficientNet-Lite0 (digits, 32 px, 2 batches of 32) the
   Spearman correlation with the exact scores was 0.70/0.64/0.66/0.80 per layer for the magnitude vs
   0.28/0.63/0.71/0.79 for the signed estimate, and the resulting attention was closer to the exact one
   in all four layers (the exact increases are >= 0 for 95-99 % of channels).
3. per layer, z-score (population std) and ``softmax(z / temperature)``, temperature 5 (authors, TLlib).

Layers (``layers``, comma-separated dotted module names; default automatic): the last block of each
stage of ResNets (``layer1..4``), the last block of each of the last four stages of timm
``blocks``-style models (EfficientNet, MobileNet), the last four ``stages`` of stage-based timm models,
the last four blocks of a flat ``blocks`` (tiny_cnn: all three). The authors hook the last conv of each
ResNet stage (before its BN); we hook the block output (after the residual sum), which also works for
models without a named last conv. Layers must output ``(B, C, H, W)`` maps.

Decisions: the frozen copy is a deep copy of the model made in ``setup`` (hooks stripped) with
``ctx.pretrained_state`` loaded, ``requires_grad=False``, locked in eval mode (its ``train()`` is a no-op)
and run under ``torch.no_grad`` on the same input tensor; its forward stops once all chosen layers have
produced their output. The fine-tuned model is in train mode, so its BatchNorm uses batch statistics while
the frozen copy uses the pretrained running statistics (``frozen_bn="eval"``, the authors' code and
TLlib): the distance is not 0 at the pretrained point during training. On a target far from ImageNet
this offset is large (ELPV, EfficientNet-Lite0, 64 px: ~3,000-4,800 at step 0 vs cross-entropy 1.4).
``frozen_bn="batch"`` makes the frozen copy's BatchNorm normalise with the batch's own statistics
(running statistics dropped, still eval mode, nothing updated), so the distance is exactly 0 at the
pretrained point and measures only the drift of the weights.
Weight decay is set to 0 in every group (authors' code and TLlib: no weight decay with DELTA); the head
term covers weight and bias.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import time
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.heads import in_head
from ..core.rifle import unwrap_model
from .base import Method, RunContext, register
from .l2sp import backbone_and_refs, disable_weight_decay, head_params, squared_distance, squared_norm

ATTENTION_MODES = ("first_order", "exact", "uniform")
HEAD_MODES = ("probe", "pretrained")
REDUCTIONS = ("sum", "mean")
FROZEN_BN = ("eval", "batch")
PROBE_L2 = 1e-3
PROBE_ITERS = 50
DRIFT_WARN = 0.5  # relative distance of the backbone from the pretrained weights after the first epoch


# -------------------------------------------------------------------------------------------------
# functional forms
# -------------------------------------------------------------------------------------------------
def attention_from_scores(scores: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """Per-layer channel attention: ``softmax(zscore(scores) / temperature)`` (population std).

    Equal scores (std 0) give uniform attention.
    """
    s = scores.detach().double()
    std = s.std(unbiased=False) if s.numel() > 1 else s.new_zeros(())
    z = (s - s.mean()) / std if float(std) > 0 else torch.zeros_like(s)
    return torch.softmax(z / temperature, dim=0).float()


def feature_map_distance(features: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                         attention: dict[str, torch.Tensor], scale: float | None = None) -> torch.Tensor:
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


class _StopForward(Exception):
    """Raised by a hook to skip the rest of the frozen model's forward."""


class FeatureTap:
    """Forward hooks that record the outputs of named layers of ``model``.

    ``grad_only``: record only when autograd is on (training forwards, not evaluation);
    ``stop``: raise :class:`_StopForward` once every layer has produced its output;
    ``transform(name, out) -> out``: optionally replace the output (attention computation).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, grad_only: bool = False,
                 stop: bool = False) -> None:
        self.layers = list(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.grad_only, self.stop = grad_only, stop
        self.transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if self.grad_only and not torch.is_grad_enabled():
                return None
            if self.transform is not None:
                out = self.transform(name, out)
            self.outputs[name] = out
            self.versions[name] = out._version if isinstance(out, torch.Tensor) else 0
            if self.stop and len(self.outputs) == len(self.layers):
                raise _StopForward
            return out if self.transform is not None else None
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The recorded outputs (then forgotten); errors for missing or in-place-modified ones."""
        out, self.outputs = self.outputs, {}
        missing = [n for n in self.layers if n not in out]
        if missing:
            raise RuntimeError(f"DELTA: no output recorded for layer(s) {missing} in this forward")
        changed = [n for n in self.layers if out[n]._version != self.versions[n]]
        if changed:
            raise RuntimeError(f"DELTA: the output of {changed} was modified in place after the layer ran; "
                               f"choose another layer (e.g. the enclosing block)")
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _is_hook_dict(name: str, value: Any) -> bool:
    return "hook" in name and isinstance(value, dict)


def frozen_copy(model: nn.Module, state: dict[str, torch.Tensor] | None = None,
                batch_stats: bool = False) -> nn.Module:
    """A deep copy of ``model`` without its hooks, with ``state`` loaded, no grads, locked in eval.

    ``batch_stats``: its BatchNorm layers normalise with the current batch's statistics (their running
    statistics are dropped, so nothing is ever updated) instead of the pretrained running statistics.
    """
    model = unwrap_model(model)
    memo: dict[int, Any] = {}
    for m in model.modules():  # hooks hold references to trainers / methods: never copy them
        for k, v in vars(m).items():
            if _is_hook_dict(k, v):
                memo[id(v)] = type(v)()
    frozen = copy.deepcopy(model, memo)
    if state is not None:
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        frozen.load_state_dict(state, strict=True)
    for p in frozen.parameters():
        p.requires_grad_(False)
        p.grad = None
    if batch_stats:
        for m in frozen.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
    nn.Module.train(frozen, False)
    frozen.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), frozen)
    return frozen


# -------------------------------------------------------------------------------------------------
# layers
# -------------------------------------------------------------------------------------------------
def default_layers(model: nn.Module) -> list[str]:
    """Automatic DELTA layers (see the module docstring); ValueError when the model is not recognised."""
    m = unwrap_model(model)
    stages = [getattr(m, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(s, nn.Sequential) and len(s) for s in stages):  # timm / torchvision ResNet
        return [f"layer{i}.{len(s) - 1}" for i, s in enumerate(stages, start=1)]
    blocks = getattr(m, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks):
        if all(isinstance(b, nn.Sequential) for b in blocks):  # EfficientNet / MobileNet stages
            return [f"blocks.{i}.{len(b) - 1}" for i, b in enumerate(blocks) if len(b)][-4:]
        return [f"blocks.{i}" for i in range(len(blocks))][-4:]
    st = getattr(m, "stages", None)
    if isinstance(st, nn.Sequential) and len(st):
        return [f"stages.{i}" for i in range(len(st))][-4:]
    raise ValueError(f"DELTA has no default layers for {type(m).__name__}: name them with --delta-layers "
                     f"(comma-separated). Candidates: {', '.join(candidate_layers(m)) or 'none'}")


def candidate_layers(model: nn.Module, exclude: Sequence[str] = (), limit: int = 60) -> list[str]:
    """Names of the model's blocks/stages (modules with children and parameters), head excluded."""
    m = unwrap_model(model)
    names = [n for n, sub in m.named_modules()
             if n and not any(n == e or n.startswith(e + ".") for e in exclude)
             and any(True for _ in sub.children()) and any(True for _ in sub.parameters())]
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def resolve_layers(model: nn.Module, spec: str | Sequence[str] | None,
                   head_names: Sequence[str] = ()) -> list[str]:
    """The DELTA layer names: ``spec`` checked against the model, or :func:`default_layers`."""
    m = unwrap_model(model)
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return default_layers(m)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    all_names = {n for n, _ in m.named_modules() if n}
    for n in names:
        if n not in all_names:
            close = difflib.get_close_matches(n, sorted(all_names), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"DELTA layer {n!r}: no such module in {type(m).__name__}.{hint} "
                             f"Available layers: {', '.join(candidate_layers(m, head_names))} "
                             f"(any name from model.named_modules() works)")
        if in_head(n, head_names):
            raise ValueError(f"DELTA layer {n!r} is (part of) the classifier head {list(head_names)}: "
                             f"choose backbone layers")
    if len(set(names)) != len(names):
        raise ValueError(f"DELTA layers list a layer twice: {names}")
    return names


# -------------------------------------------------------------------------------------------------
# channel attention
# -------------------------------------------------------------------------------------------------
def fit_probe(model: nn.Module, head: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
              l2: float = PROBE_L2, max_iter: int = PROBE_ITERS) -> float | None:
    """Fit ``head`` (a module of the frozen ``model`` whose output is the logits) on frozen features.

    Returns the probe's training accuracy, or ``None`` (head untouched) when the head's output is not
    the model's output.
    """
    cache: dict[str, torch.Tensor] = {}
    handle = head.register_forward_pre_hook(lambda mod, args: cache.__setitem__("f", args[0]))
    feats, ys = [], []
    try:
        with torch.no_grad():
            for i, (x, y) in enumerate(batches):
                logits = model(x)
                f = cache.pop("f")
                if i == 0:
                    again = head(f)
                    if not (isinstance(logits, torch.Tensor) and logits.shape == again.shape
                            and torch.allclose(again, logits, rtol=1e-4, atol=1e-5)):
                        return None
                feats.append(f.float())
                ys.append(y)
    finally:
        handle.remove()
    fx, fy = torch.cat(feats), torch.cat(ys)
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(fx).float(), fy) + 0.5 * l2 * squared_norm(params)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    with torch.no_grad():
        return float((head(fx).argmax(1) == fy).float().mean())


def first_order_scores(model: nn.Module, layers: Sequence[str],
                       batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       signed: bool = False) -> dict[str, torch.Tensor]:
    """Per channel: ``|sum_{b,h,w} F * dL/dF|`` (first-order estimate of the loss change when the
    channel is zeroed; L = mean cross-entropy of ``model``), averaged over batches.

    Parameters need no gradient: the first hooked output is made a leaf requiring grad.
    """
    tap = FeatureTap(model, layers)
    acts: dict[str, torch.Tensor] = {}

    def transform(name: str, out: torch.Tensor) -> torch.Tensor:
        a = out if out.requires_grad else out.detach().requires_grad_(True)
        acts[name] = a
        return a.clone()  # downstream in-place ops touch the clone, not the recorded activation

    tap.transform = transform
    sums: dict[str, torch.Tensor] = {}
    n = 0
    try:
        for x, y in batches:
            acts.clear()
            with torch.enable_grad():
                loss = F.cross_entropy(model(x).float(), y)
                grads = torch.autograd.grad(loss, [acts[name] for name in layers], allow_unused=True)
            for name, g in zip(layers, grads):
                a = acts[name].detach()
                g = torch.zeros_like(a) if g is None else g
                s = -(a.float() * g.float()).sum(dim=(0, 2, 3))
                s = s if signed else s.abs()
                sums[name] = s if name not in sums else sums[name] + s
            n += 1
            tap.outputs.clear()
    finally:
        tap.remove()
    if n == 0:
        raise ValueError("DELTA attention needs at least one training batch")
    return {name: sums[name] / n for name in layers}


def exact_scores(model: nn.Module, layers: Sequence[str],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per channel: ``L(channel zeroed) - L`` (mean cross-entropy), averaged over batches (TLlib)."""
    target: dict[str, Any] = {"layer": None, "channel": -1}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if target["layer"] != name:
                return None
            out = out.clone()
            out[:, target["channel"]] = 0
            return out
        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in layers]
    sums: dict[str, torch.Tensor] = {}
    n = 0
    try:
        with torch.no_grad():
            for x, y in batches:
                target["layer"] = None
                tap = FeatureTap(model, layers)
                loss0 = F.cross_entropy(model(x).float(), y)
                shapes = {k: v.shape[1] for k, v in tap.outputs.items()}
                tap.remove()
                for name in layers:
                    inc = torch.empty(shapes[name], dtype=torch.float64)
                    target["layer"] = name
                    for c in range(shapes[name]):
                        target["channel"] = c
                        inc[c] = float(F.cross_entropy(model(x).float(), y) - loss0)
                    target["layer"] = None
                    sums[name] = inc if name not in sums else sums[name] + inc
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("DELTA attention needs at least one training batch")
    return {name: (sums[name] / n).float() for name in layers}


def _all_reduce_mean(scores: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Average the scores over DDP ranks (identical attention on every replica)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores
    out = {}
    for name, s in scores.items():
        t = s.detach().to(device=device, dtype=torch.float32).clone()
        dist.all_reduce(t)
        out[name] = t / dist.get_world_size()
    return out


# -------------------------------------------------------------------------------------------------
# the method
# -------------------------------------------------------------------------------------------------
@register("delta")
@dataclass
class DELTA(Method):
    """DELTA: attention-weighted distance to the pretrained model's feature maps + beta/2 ||w_head||^2."""

    alpha: float = 0.01            # feature-map term (authors' code, TLlib)
    beta: float = 0.01             # L2 on the head (authors' code, TLlib)
    layers: str | None = None      # comma-separated dotted module names; None = automatic
    attention: str = "first_order"  # "first_order" | "exact" | "uniform"
    attention_batches: int = 10    # training batches used for the attention (TLlib: up to 10)
    attention_head: str = "probe"  # "probe" (fit a linear probe first) | "pretrained"
    temperature: float = 5.0       # softmax temperature over z-scores (authors, TLlib)
    reduction: str = "sum"         # "sum" (1/2 sum over a --batch-size batch, authors) | "mean"
    frozen_bn: str = "eval"        # "eval" (pretrained running stats, authors) | "batch" (batch stats)

    kind = "reg"
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
                ctx.log(f"DELTA: checkpoint attention is for {pending.get('layers')}, not "
                        f"{self.layer_names}: recomputing")
            self.channel_attention = self._compute_attention(ctx)
        self._tap = FeatureTap(inner, self.layer_names, grad_only=True)
        self._ref_tap = FeatureTap(self.frozen, self.layer_names, stop=True)
        # conv / linear weights only (as in the depth analysis): BatchNorm's affine parameters would
        # dominate the norm and hide the drift
        self._drift_pairs = ([(p, r) for p, r in zip(*backbone_and_refs(inner, self._head_modules,
                                                                         ctx.pretrained_state)) if p.dim() > 1]
                             if ctx.pretrained_state is not None else [])
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
                f"{self.alpha:g} here (its default was set for ResNets at 224 px). Use a smaller --delta-alpha "
                f"(EfficientNet-Lite0 / ELPV at 112 px, relative change of the first third of the backbone after "
                f"10 epochs: alpha 0.01 -> 2.2, 0.001 -> 0.23, 0.0001 -> 0.066, plain fine-tuning 0.05; "
                f"docs/results/elpv.md).", stacklevel=2)
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
        shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                  for k, v in tap.outputs.items()}
        tap.remove()
        for name, shape in shapes.items():
            if not isinstance(shape, tuple) or len(shape) != 4:
                raise ValueError(f"DELTA needs convolutional feature maps (B, C, H, W); layer {name!r} "
                                 f"outputs {shape}: choose other --delta-layers")
        if self.attention == "uniform":
            att = {k: torch.full((s[1],), 1.0 / s[1], device=ctx.device) for k, s in shapes.items()}
            ctx.log(f"DELTA: uniform channel attention on {self.layer_names}")
            return att
        probe = ""
        if self.attention_head == "probe":
            heads = [self.frozen.get_submodule(h) for h in ctx.head_names] if len(ctx.head_names) == 1 else []
            acc = fit_probe(self.frozen, heads[0], batches) if heads else None
            probe = (f", linear probe fitted on {sum(len(y) for _, y in batches)} images (train acc "
                     f"{acc:.3f})" if acc is not None else ", no probe (head output is not the logits): "
                     f"pretrained head used")
        scorer = first_order_scores if self.attention == "first_order" else exact_scores
        scores = _all_reduce_mean(scorer(self.frozen, self.layer_names, batches), ctx.device)
        att = {k: attention_from_scores(v, self.temperature).to(ctx.device) for k, v in scores.items()}
        spread = ", ".join(f"{k}: {len(a)} ch, max/min {float(a.max() / a.min()):.2f}" for k, a in att.items())
        ctx.log(f"DELTA: {self.attention} channel attention from {len(batches)} batch(es){probe} in "
                f"{time.perf_counter() - t0:.1f} s [{spread}]")
        return att

    def loss_terms(self, logits: torch.Tensor, features: torch.Tensor | None, x: torch.Tensor,
                   y: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.frozen is not None and self._tap is not None and self._ref_tap is not None, "setup() first"
        feats = self._tap.take()
        self._ref_tap.outputs.clear()
        with torch.no_grad():
            try:
                self.frozen(x)
            except _StopForward:
                pass
        ref = self._ref_tap.take()
        if self.reduction == "sum":
            scale = (self._batch or len(y)) / 2.0
        else:
            scale = 0.5
        dist = feature_map_distance(feats, ref, self.channel_attention, scale=scale)
        return {"delta": self.alpha * dist,
                "delta_head": 0.5 * self.beta * squared_norm(head_params(self._head_modules))}

    def state_dict(self) -> dict[str, Any]:
        if not self.channel_attention:
            return {}
        return {"layers": list(self.layer_names),
                "attention": {k: v.detach().cpu() for k, v in self.channel_attention.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.frozen is None:  # before setup (the trainer restores, then calls setup)
            self._pending = state
            return
        if list(state.get("layers", [])) != self.layer_names:
            raise ValueError(f"DELTA state is for layers {state.get('layers')}, this run uses {self.layer_names}")
        self.channel_attention = {k: v.to(self._device) for k, v in state["attention"].items()}
