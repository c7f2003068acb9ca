"""Backprop in depth, the numbers: per-layer relative weight change ``||W(T) - W(0)|| / ||W(0)||`` of
the conv / linear weights, gradient-norm ratios around re-inits (from ``depth.jsonl``, read by
:func:`read_monitor`), and their means by backbone third.

Measures the claim of Li et al., "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349 (§3-4): re-initialising the head
sends a large error into the lower layers. Definitions and rationale: docs/experiments.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.structure import weight_layers

DEPTH_JSON = "depth.json"
DEPTH_JSONL = "depth.jsonl"


def tracked_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``[(state-dict key of the weight, layer kind), ...]`` for conv / linear layers, in module order."""
    return [(f"{name}.weight" if name else "weight", type(m).__name__) for name, m in weight_layers(model)]


def relative_change(current: torch.Tensor, reference: torch.Tensor) -> float:
    """``||current - reference|| / ||reference||`` in float64 (``inf`` when the reference is zero)."""
    cur, ref = current.detach().double().cpu(), reference.detach().double().cpu()
    num, den = float(torch.linalg.vector_norm(cur - ref)), float(torch.linalg.vector_norm(ref))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def layer_profile(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], names: Sequence[str]
) -> list[float]:
    """Relative change of each named tensor of ``state`` against ``reference``."""
    missing = [n for n in names if n not in state or n not in reference]
    if missing:
        raise KeyError(f"tensors missing from the checkpoint or the reference model: {missing[:5]}")
    return [relative_change(state[n], reference[n]) for n in names]


def read_monitor(run_dir: str | Path) -> dict[str, Any] | None:
    """``depth.jsonl`` as ``{"header": {...}, "weights": [...], "grad": [...]}`` (None if absent)."""
    p = Path(run_dir) / DEPTH_JSONL
    if not p.is_file():
        return None
    out: dict[str, Any] = {"header": None, "weights": [], "grad": []}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("type") == "layers":
            out["header"] = rec
        elif rec.get("type") in ("weights", "grad"):
            out[rec["type"]].append(rec)
    return out


def backbone_thirds(values: Sequence[float], head: Sequence[bool]) -> list[float]:
    """Mean of ``values`` over the first / middle / last third of the backbone (head layers left out).

    The thirds are contiguous in forward order; the middle one takes the remainder
    (49 layers: 16 / 17 / 16).
    """
    body = [float(v) for v, h in zip(values, head) if not h]
    if not body:
        raise ValueError("no backbone layers (every tracked layer is in the head)")
    third = max(1, len(body) // 3)
    parts = [
        body[:third],
        body[third : len(body) - third] or body[third - 1 : third],
        body[len(body) - third :],
    ]
    return [sum(x) / len(x) for x in parts]


def grad_window_means(mon: dict[str, Any]) -> dict[int, dict[str, tuple[list[float], int]]]:
    """Per watched (re-init) epoch: ``{"before": (mean norm per layer, steps), "after": (...)}``.

    ``before`` = the recorded steps with ``offset < 0``, ``after`` = ``offset >= 0``; records with a
    missing norm are left out, and a side without records is absent.
    """
    grads = [g for g in mon.get("grad", []) if all(v is not None for v in g["norms"])]
    out: dict[int, dict[str, tuple[list[float], int]]] = {}
    for e in sorted({g["reinit_epoch"] for g in grads}):
        for side in ("before", "after"):
            recs = [
                g["norms"]
                for g in grads
                if g["reinit_epoch"] == e and (g["offset"] < 0) == (side == "before")
            ]
            if recs:
                out.setdefault(e, {})[side] = ([sum(col) / len(recs) for col in zip(*recs)], len(recs))
    return out


def gradient_ratios(mon: dict[str, Any]) -> list[float | None] | None:
    """Per layer: mean gradient norm in the recorded steps after / before the watched epoch boundaries.

    For each watched (re-init) epoch, ``mean(after) / mean(before)`` per layer (:func:`grad_window_means`),
    then averaged over the watched epochs. None without an epoch recorded on both sides; a layer whose
    ``before`` mean is 0 gets None.
    """
    per_epoch = [
        [a / b if b > 0 else None for a, b in zip(w["after"][0], w["before"][0])]
        for w in grad_window_means(mon).values()
        if "before" in w and "after" in w
    ]
    if not per_epoch:
        return None
    out: list[float | None] = []
    for col in zip(*per_epoch):
        vals = [v for v in col if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def summarize_monitor(mon: dict[str, Any] | None) -> dict[str, Any] | None:
    """The numbers behind "does it move the lower layers more?" for one run's ``depth.jsonl``.

    ``rel_change``: mean relative weight change (last recorded epoch) of the first / middle / last
    backbone third; ``head_rel_change``; ``grad_ratio``: :func:`gradient_ratios` per third and
    ``head_grad_ratio`` (None when no gradients were recorded); ``watch_epochs``.
    """
    if not mon or not mon.get("header") or not mon.get("weights"):
        return None
    head = mon["header"]["head"]
    rel = mon["weights"][-1]["rel_change"]
    out: dict[str, Any] = {
        "rel_change": backbone_thirds(rel, head),
        "epoch": mon["weights"][-1]["epoch"],
        "head_rel_change": _mean_of([v for v, h in zip(rel, head) if h]),
        "grad_ratio": None,
        "head_grad_ratio": None,
        "watch_epochs": mon["header"].get("watch_epochs"),
    }
    ratios = gradient_ratios(mon)
    if ratios is not None:
        pairs = [(r, h) for r, h in zip(ratios, head) if r is not None]
        if any(not h for _, h in pairs):
            out["grad_ratio"] = backbone_thirds([r for r, _ in pairs], [h for _, h in pairs])
        out["head_grad_ratio"] = _mean_of([r for r, h in pairs if h])
    return out


def _mean_of(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
