"""Evaluate a fine-tuned run (:class:`rifle.inference.FineTunedModel`) on a labelled dataset: the split
to read (:func:`load_eval_split`), accuracy / confusion / per-class metrics (:func:`evaluate`), and the
confusion-matrix figure (:func:`plot_confusion`). On the run's own data and split it reproduces the
accuracy training reported (docs/inference.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from .data import BUILTIN, ImageTensorSet, build_data, eval_batches, parse_spec
from .data.folder import IMAGE_EXTENSIONS, DataError, decode_many
from .inference import FineTunedModel

__all__ = ["classification_metrics", "evaluate", "load_eval_split", "EvalSplit", "plot_confusion"]


@dataclass
class EvalSplit:
    """A labelled split to evaluate: images uint8 with labels already in the run's class indices."""

    images: ImageTensorSet
    data_classes: list[str]
    name: str
    split: str
    paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _is_builtin(data: str) -> bool:
    """A built-in name or a published dataset's ``NAME:ROOT``: split by the run's own rules."""
    return (data.strip().lower() in BUILTIN and "/" not in data and os.sep not in data) or parse_spec(
        data
    ) is not None


def _scan_flat(root: Path) -> dict[str, list[Path]]:
    by_class: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p)):
        imgs = sorted(
            f for f in d.iterdir() if f.is_file() and not _hidden(f) and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if imgs:
            by_class[d.name] = imgs
    return by_class


def _decode_flat(
    root: Path, res: int, skip_bad_images: bool
) -> tuple[ImageTensorSet, list[str], list[str], list[str]]:
    by_class = _scan_flat(root)
    if not by_class:
        raise DataError(
            f"{root} has no class folders with images; expected ROOT/<class>/<image> or "
            f"ROOT/{{train,val,test}}/<class>/<image> (extensions {' '.join(IMAGE_EXTENSIONS)}). "
            f"For unlabelled images use `rifle predict`."
        )
    classes = list(by_class)
    paths = [p for c in classes for p in by_class[c]]
    labels = [i for i, c in enumerate(classes) for _ in by_class[c]]
    decoded = decode_many(paths, res, desc=f"decoding {root.name}")
    bad = [(p, r) for p, r in zip(paths, decoded) if isinstance(r, Exception)]
    if bad and not skip_bad_images:
        shown = "\n".join(f"  {p}: {type(e).__name__}: {e}" for p, e in bad[:5])
        raise DataError(
            f"cannot read {len(bad)} image file(s):\n{shown}\nFix or remove them, or pass --skip-bad-images."
        )
    keep = [i for i, r in enumerate(decoded) if isinstance(r, torch.Tensor)]
    kept = [cast(torch.Tensor, decoded[i]) for i in keep]
    channels = 3 if any(t.shape[0] == 3 for t in kept) else 1
    imgs = torch.empty((len(keep), channels, res, res), dtype=torch.uint8)
    for j, t in enumerate(kept):
        imgs[j] = t
    ds = ImageTensorSet(imgs, torch.tensor([labels[i] for i in keep], dtype=torch.int64))
    return ds, classes, [str(paths[i]) for i in keep], [str(p) for p, _ in bad]


def load_eval_split(
    fm: FineTunedModel, data: str | os.PathLike, split: str = "test", *, skip_bad_images: bool = False
) -> EvalSplit:
    """The labelled images of ``data``'s ``split``, labels mapped onto ``fm.classes``.

    * a built-in name, a published ``NAME:ROOT``, or a folder with ``train/``/``test/``: the run's own
      split rules (its seed, val_fraction, train_fraction, train_per_class) via
      :func:`rifle.data.build_data`, so the run's data gives the run's splits; ``test`` (and ``val``
      when the folder has ``val/``) of a folder is read from ``ROOT/<split>/`` alone;
    * a flat folder ``ROOT/<class>/<image>``: every image, one split (``split`` is ignored).

    A class of ``data`` that the run does not know is an error naming it.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    res, cfg = fm.resolution, fm.config
    text = os.fspath(data)
    paths: list[str] | None = None
    skipped: list[str] = []
    root = Path(text).expanduser()
    if not _is_builtin(text) and not root.exists():
        build_data(text, fm.image_size)  # raises the data module's error (did-you-mean, layout)
    if not _is_builtin(text) and not root.is_dir():
        raise DataError(f"--data {text}: not a folder")
    layout = _is_builtin(text) or any((root / s).is_dir() for s in ("train", "val", "test"))
    if not layout:
        ds, data_classes, paths, skipped = _decode_flat(root, res, skip_bad_images)
        name, split = root.resolve().name, "all"
    elif not _is_builtin(text) and (split == "test" or (split == "val" and (root / "val").is_dir())):
        if not (root / split).is_dir():
            raise DataError(
                f"{root / split} does not exist; choose --split among "
                f"{', '.join(s for s in ('train', 'val', 'test') if (root / s).is_dir())}"
            )
        ds, data_classes, paths, skipped = _decode_flat(root / split, res, skip_bad_images)
        name = root.resolve().name
    else:
        bundle = build_data(
            text,
            fm.image_size,
            seed=int(cfg.get("seed", 0)),
            val_fraction=float(cfg.get("val_fraction", 0.1)),
            train_fraction=float(cfg.get("train_fraction", 1.0)),
            train_per_class=cfg.get("train_per_class"),
            skip_bad_images=skip_bad_images,
        )
        ds, data_classes = getattr(bundle, split), bundle.classes
        name, skipped = bundle.info.get("name", text), list(bundle.info.get("skipped", []))
        if len(ds) == 0:
            raise DataError(
                f"the {split} split of {text} is empty (val_fraction "
                f"{cfg.get('val_fraction')!r} in the run's config)"
            )
    unknown = [c for c in data_classes if c not in fm.classes]
    if unknown:
        raise DataError(
            f"--data {text} has classes the run was not trained on: {', '.join(unknown)} "
            f"(run classes: {', '.join(fm.classes)}). Evaluate on data with the run's classes "
            f"(a subset is fine)"
        )
    remap = torch.tensor([fm.classes.index(c) for c in data_classes], dtype=torch.int64)
    ds = ds.with_labels(remap[ds.labels])
    return EvalSplit(ds, list(data_classes), str(name), split, paths, skipped)


def classification_metrics(
    y_true: torch.Tensor, y_pred: torch.Tensor, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, confusion matrix (rows = true class, columns = predicted) and per-class precision,
    recall, F1 and support.

    Undefined values: precision of a class never predicted is 0; recall and F1 of a class with no
    images (support 0) are ``None`` and such classes are left out of the macro averages (which are
    sklearn's ``average="macro"`` over the classes present, ``zero_division=0``).
    """
    k = len(classes)
    y_true, y_pred = torch.as_tensor(y_true).long(), torch.as_tensor(y_pred).long()
    cm = torch.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    per_class: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(classes):
        p = float(tp[i] / predicted[i]) if predicted[i] else 0.0
        r = float(tp[i] / support[i]) if support[i] else None
        f1 = None if r is None else (2 * p * r / (p + r) if p + r > 0 else 0.0)
        per_class[c] = {"precision": p, "recall": r, "f1": f1, "support": int(support[i])}
    present = [v for v in per_class.values() if v["support"]]
    macro = {
        m: (sum(v[m] for v in present) / len(present) if present else None)
        for m in ("precision", "recall", "f1")
    }
    n = int(y_true.numel())
    return {
        "n": n,
        "accuracy": float(tp.sum()) / n if n else 0.0,
        "per_class": per_class,
        "macro": macro,
        "confusion_matrix": cm.tolist(),
    }


def evaluate(
    fm: FineTunedModel,
    data: str | os.PathLike | None = None,
    split: str = "test",
    *,
    batch_size: int | None = None,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Metrics of ``fm`` on ``data``'s ``split`` (default: the run's own data); see
    :func:`classification_metrics`. Also ``loss`` (mean cross-entropy) and per-image ``predictions``
    (predicted index, probability). Same pipeline and batch size as the trainer's evaluation."""
    data = data if data is not None else fm.config.get("data")
    if data is None:
        raise ValueError("no data given and the run's config names none")
    es = load_eval_split(fm, data, split, skip_bad_images=skip_bad_images)
    bs = int(batch_size or fm.config.get("eval_batch_size", 256))
    logits = []
    for x, _ in eval_batches(
        es.images,
        bs,
        fm.image_size,
        fm.preprocessing["mean"],
        fm.preprocessing["std"],
        channels_last=fm.channels_last,
    ):
        logits.append(fm.logits(x))
    z = torch.cat(logits) if logits else torch.zeros(0, fm.num_classes)
    y = es.images.labels
    proba = z.softmax(1)
    conf, pred = proba.max(1) if len(z) else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    out = {
        "run": str(fm.run_dir) if fm.run_dir else None,
        "epoch": fm.epoch,
        "data": os.fspath(data),
        "data_name": es.name,
        "split": es.split,
        "classes": list(fm.classes),
        **classification_metrics(y, pred, fm.classes),
        "loss": float(F.cross_entropy(z, y, reduction="mean")) if len(z) else None,
        "classes_not_in_data": [c for c in fm.classes if c not in es.data_classes],
        "skipped": es.skipped,
        "predictions": [
            {
                "index": i,
                **({"path": es.paths[i]} if es.paths else {}),
                "true": fm.classes[int(t)],
                "predicted": fm.classes[int(p)],
                "probability": float(c),
            }
            for i, (t, p, c) in enumerate(zip(y.tolist(), pred.tolist(), conf.tolist()))
        ],
    }
    return out


def plot_confusion(
    cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Save the confusion matrix as a PNG (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = np.asarray(cm)
    k = len(classes)
    size = max(4.0, 0.5 * k + 2.5)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(a, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 30:
        thresh = a.max() / 2 if a.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(a[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if a[i, j] > thresh else "black",
                )
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
