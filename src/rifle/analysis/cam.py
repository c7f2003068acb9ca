"""Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017, arXiv 1610.02391), pytorch only: ``cam = ReLU(sum_c alpha_c A_c)`` with
``alpha_c = mean_{i,j} dy_k / dA_{c,i,j}`` (eq. 1-2), upsampled to the input and divided by its
per-image maximum. Which feature map ``A`` and class ``k``: docs/experiments.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def last_conv_name(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: name a layer for Grad-CAM")
    return names[-1]


def _features_and_logits(
    model: nn.Module, x: torch.Tensor, layer: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    features, head = getattr(model, "forward_features", None), getattr(model, "forward_head", None)
    if layer is None and callable(features) and callable(head):
        feats = features(x)
        return feats, head(feats)
    module = model.get_submodule(layer or last_conv_name(model))
    box: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, a, out: box.__setitem__("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if "a" not in box:
        raise ValueError(f"layer {layer!r} was not used in the forward pass")
    return box["a"], logits


def grad_cam_maps(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Grad-CAM maps ``[B, h, w]`` (ReLU, not normalised), the logits and the target classes."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            feats, logits = _features_and_logits(model, x.detach(), layer)
            if feats.dim() != 4:
                raise ValueError(f"Grad-CAM needs a [B, C, h, w] feature map, got shape {tuple(feats.shape)}")
            target = logits.argmax(1) if target is None else torch.as_tensor(target, device=logits.device)
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, feats)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feats).sum(1)).detach()
    finally:
        model.train(was_training)
    return cam, logits.detach(), target


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM maps ``[B, H, W]`` at the input size in ``[0, 1]``, the logits and the target classes."""
    cam, logits, target = grad_cam_maps(model, x, target, layer)
    up = F.interpolate(cam[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp_min(0)
    peak = up.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, up / peak.clamp_min(1e-12), torch.zeros_like(up)), logits, target


def pick_images(labels: torch.Tensor, n: int) -> list[int]:
    """``n`` test indices, round-robin over classes (the first images of each class, in order)."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        by_class.setdefault(int(y), []).append(i)
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][depth])
        depth += 1
    return out


def cam_figure(
    images: torch.Tensor,
    rows: Sequence[dict[str, Any]],
    labels: torch.Tensor,
    classes: Sequence[str],
    path: str | Path,
    title: str = "",
) -> None:
    """A PNG grid: first row the images (``[B, 3, H, W]`` in [0, 1]), then one row of overlays per run.

    Each ``rows`` item: ``{"label": str, "cam": [B, H, W], "pred": [B]}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = images.shape[0]
    fig, axes = plt.subplots(
        1 + len(rows), b, figsize=(1.25 * b, 1.35 * (1 + len(rows))), dpi=72, squeeze=False
    )
    imgs = images.permute(0, 2, 3, 1).clamp(0, 1).cpu().numpy()
    for j in range(b):
        axes[0][j].imshow(imgs[j])
        axes[0][j].set_title(f"true {classes[int(labels[j])]}"[:22], fontsize=6)
        for i, row in enumerate(rows, start=1):
            axes[i][j].imshow(imgs[j].mean(-1), cmap="gray")
            axes[i][j].imshow(row["cam"][j].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ok = int(row["pred"][j]) == int(labels[j])
            axes[i][j].set_title(
                f"{'✓' if ok else '✗'} {classes[int(row['pred'][j])]}"[:22],
                fontsize=6,
                color="black" if ok else "red",
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, row in enumerate(rows, start=1):
        axes[i][0].set_ylabel(row["label"][:18], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cam_for_runs(
    run_dirs: Sequence[str | Path], out_png: str | Path, *, n_images: int = 8, layer: str | None = None
) -> dict[str, Any]:
    """Grad-CAM of each run's final checkpoint on the same ``n_images`` test images, side by side."""
    from ..config import from_dict
    from ..data import eval_batches
    from ..models import model_preprocessing
    from ..build import load_data
    from .runs import load_run_model, run_label

    models = [load_run_model(r) for r in run_dirs]
    cfgs = [from_dict(c) for _, c, _ in models]
    if len({(c.data, c.image_size) for c in cfgs}) != 1:
        raise ValueError(
            "Grad-CAM side by side needs runs on the same data and image size, got "
            + ", ".join(f"{c.data}@{c.image_size}" for c in cfgs)
        )
    data = load_data(cfgs[0])
    idx = pick_images(data.test.labels, n_images)
    subset = data.test.subset(idx)
    rows: list[dict[str, Any]] = []
    shown, labels = None, None
    for run, (model, config, _), cfg in zip(run_dirs, models, cfgs):
        prep = model_preprocessing(model)
        x, y = next(
            eval_batches(subset, len(idx), cfg.image_size, prep["mean"], prep["std"], channels_last=False)
        )
        cam, logits, _ = grad_cam(model, x, layer=layer)
        rows.append({"label": run_label(run, config), "cam": cam, "pred": logits.argmax(1)})
        if shown is None:
            mean = torch.tensor(prep["mean"]).view(1, 3, 1, 1)
            std = torch.tensor(prep["std"]).view(1, 3, 1, 1)
            shown, labels = x * std + mean, y
    assert shown is not None and labels is not None  # one row per run, and there is at least one
    cam_figure(
        shown,
        rows,
        labels,
        data.classes,
        out_png,
        title=f"Grad-CAM ({layer or 'forward_features output'}), predicted class, {cfgs[0].data} test",
    )
    return {
        "png": str(out_png),
        "indices": idx,
        "accuracy": {r["label"]: float((r["pred"] == labels).float().mean()) for r in rows},
    }
