"""DELTA's channel attention: how much the pretrained model's loss depends on each feature-map channel.

Support code of :mod:`rifle.methods.delta` (Li et al., "DELTA: DEep Learning Transfer using Feature Map
with Attention for Convolutional Networks", ICLR 2019, arXiv 1901.09229). A linear probe stands in for
the new head (:func:`fit_probe`); per-channel scores are the first-order estimate of the loss change when
a channel is zeroed (:func:`first_order_scores`, as in Taylor channel pruning, Molchanov et al., ICLR
2017, arXiv 1611.06440) or the measured change (:func:`exact_scores`, the authors' code and TLlib);
:func:`attention_from_scores` turns them into a softmax over z-scores. Choices and measurements:
docs/methods.md "delta", "Attention".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.replicas import distributed_world
from ._feature_taps import FeatureTap
from ._penalties import squared_norm

PROBE_L2 = 1e-3
PROBE_ITERS = 50


def attention_from_scores(scores: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """Per-layer channel attention: ``softmax(zscore(scores) / temperature)`` (population std).

    Equal scores (std 0) give uniform attention.
    """
    s = scores.detach().double()
    std = s.std(unbiased=False) if s.numel() > 1 else s.new_zeros(())
    z = (s - s.mean()) / std if float(std) > 0 else torch.zeros_like(s)
    return torch.softmax(z / temperature, dim=0).float()


def fit_probe(
    model: nn.Module,
    head: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    l2: float = PROBE_L2,
    max_iter: int = PROBE_ITERS,
) -> float | None:
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
                    if not (
                        isinstance(logits, torch.Tensor)
                        and logits.shape == again.shape
                        and torch.allclose(again, logits, rtol=1e-4, atol=1e-5)
                    ):
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


def first_order_scores(
    model: nn.Module,
    layers: Sequence[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    signed: bool = False,
) -> dict[str, torch.Tensor]:
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


def exact_scores(
    model: nn.Module, layers: Sequence[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
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


def all_reduce_mean(scores: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Average the scores over DDP ranks (identical attention on every replica)."""
    import torch.distributed as dist

    world = distributed_world()
    if world == 1:
        return scores
    out = {}
    for name, s in scores.items():
        t = s.detach().to(device=device, dtype=torch.float32).clone()
        dist.all_reduce(t)
        out[name] = t / world
    return out
