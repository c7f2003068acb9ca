"""Use a fine-tuned run: :func:`load` it, predict images, evaluate it on a labelled dataset.

A run folder (``rifle train --out RUN``) needs ``config.yaml`` and ``checkpoint.safetensors``;
``summary.json`` (written when training finishes) supplies the classes and preprocessing when present,
otherwise they come from the checkpoint's metadata and the model. Weights are read only from safetensors
(nothing is unpickled) into ``create_model(name, num_classes, pretrained=False)``: nothing is downloaded.

Preprocessing is the run's evaluation transform, bit for bit: :func:`rifle.data.decode_image` (shorter
side resized to ``R = round(S * 8 / 7)``, bilinear antialiased, centre ``R x R`` cut), then
:func:`rifle.data.eval_batches` (centre crop ``S``, ``(x / 255 - mean) / std``, grayscale -> 3 channels).
Evaluation on the run's own data and split therefore reproduces the accuracy training reported.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from .data import BUILTIN, ImageTensorSet, build_data, cache_resolution, decode_image, eval_batches
from .data.folder import IMAGE_EXTENSIONS, DataError, decode_many
from .train.checkpoint import WEIGHTS, CheckpointError, load_weights, read_weights
from .train.outputs import CONFIG, SUMMARY

__all__ = ["FineTunedModel", "load", "NotARunError", "RunError", "ImageInput", "find_images",
           "classification_metrics", "evaluate", "load_eval_split", "EvalSplit"]

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor, np.ndarray]
REQUIRED = (CONFIG, WEIGHTS)


class NotARunError(FileNotFoundError):
    """The folder is not a run made by ``rifle train`` (missing, or lacks its files)."""


class RunError(ValueError):
    """The run folder's files are unreadable or do not fit together (e.g. the checkpoint does not fit)."""


# ------------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path}: {e}") from None


def _checked_run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise NotARunError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise NotARunError(f"{path} is not a folder; pass the folder written by `rifle train --out`")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise NotARunError(f"{path} is not a run folder: missing {', '.join(missing)} (a run made by "
                           f"`rifle train --out {path}` holds {', '.join(REQUIRED)}, {SUMMARY}, ...)")
    return path


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> "FineTunedModel":
    """Load the fine-tuned model of a run folder (the weights of its last completed epoch), in eval mode.

    Raises :class:`NotARunError` (a ``FileNotFoundError``) when the folder or its files are missing and
    :class:`RunError` (a ``ValueError``) when they cannot be read or the checkpoint does not fit the model.
    """
    from .models import create_model, model_preprocessing

    path = _checked_run_dir(run_dir)
    try:
        config = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"cannot read {path / CONFIG}: {e}") from None
    if not isinstance(config, dict) or "model" not in config or "image_size" not in config:
        raise RunError(f"{path / CONFIG} is not a rifle run config (needs 'model' and 'image_size')")
    summary = _read_json(path / SUMMARY) or {}
    wpath = path / WEIGHTS
    try:
        meta, tensors = read_weights(wpath)  # checksum verified
    except CheckpointError as e:
        raise RunError(str(e)) from None
    try:
        meta_j = {k: json.loads(v) for k, v in meta.items()}
    except ValueError as e:
        raise RunError(f"{wpath}: unreadable metadata ({e})") from None
    classes = meta_j.get("classes", summary.get("classes"))
    if not isinstance(classes, list) or not classes:
        raise RunError(f"{wpath} names no classes (metadata 'classes') and {path / SUMMARY} has none")
    classes = [str(c) for c in classes]
    if summary.get("classes") is not None and [str(c) for c in summary["classes"]] != classes:
        raise RunError(f"{path / SUMMARY} classes {summary['classes']} differ from the checkpoint's "
                       f"{classes}; the folder mixes two runs")
    model_name = meta_j.get("model", config["model"])
    if model_name != config["model"]:
        raise RunError(f"{wpath} holds a {model_name!r} model but {path / CONFIG} says {config['model']!r}")
    num_classes = int(meta_j.get("num_classes", len(classes)))
    if num_classes != len(classes):
        raise RunError(f"{wpath}: num_classes {num_classes} but {len(classes)} class names")
    model = create_model(model_name, num_classes, pretrained=False)
    try:
        load_weights(model, tensors, str(wpath))
    except CheckpointError as e:
        raise RunError(str(e)) from None
    image_size = int(config["image_size"])
    prep = summary.get("preprocessing") or {**model_preprocessing(model), "image_size": image_size,
                                             "resize": cache_resolution(image_size)}
    prep = {**prep, "mean": [float(v) for v in prep["mean"]], "std": [float(v) for v in prep["std"]]}
    if int(prep["image_size"]) != image_size or int(prep["resize"]) != cache_resolution(image_size):
        raise RunError(f"{path / SUMMARY}: preprocessing {prep} does not match image_size {image_size}")
    epoch = int(meta["epoch"]) if str(meta.get("epoch", "")).isdigit() else None
    return FineTunedModel(model, classes, prep, device=device,
                          channels_last=bool(config.get("channels_last", True)), run_dir=path,
                          config=config, summary=summary, epoch=epoch)


# --------------------------------------------------------------------------------------- the model
def _decode_pil(img: Image.Image, res: int) -> torch.Tensor:
    """``decode_image`` for an in-memory PIL image: a lossless re-encode, so the two cannot drift apart."""
    for fmt, kw in (("PNG", {"compress_level": 0}), ("TIFF", {})):
        buf = io.BytesIO()
        try:
            img.save(buf, format=fmt, **kw)
        except (OSError, ValueError, KeyError):
            continue
        buf.seek(0)
        return decode_image(buf, res)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=0)  # what decode_image does to other modes
    buf.seek(0)
    return decode_image(buf, res)


def _tensor_to_u8(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"an image tensor must be [C, H, W] or [N, C, H, W] with C = 1 or 3 (or [H, W]); "
                         f"got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t
    if not t.dtype.is_floating_point:
        raise ValueError(f"image tensors must be uint8 (0..255) or float (0..1), got {t.dtype}")
    lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"a float image tensor must hold pixel values in [0, 1] (as torchvision's "
                         f"ToTensor gives), got [{lo:.3g}, {hi:.3g}]; for already-normalised model input "
                         f"call FineTunedModel.logits(x)")
    return (t.float() * 255).round_().clamp_(0, 255).to(torch.uint8)


def _flatten(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images.unbind(0)) if images.dim() == 4 else [images]
    if isinstance(images, np.ndarray):
        return [images]
    out = list(images)
    return [t for x in out for t in (x.unbind(0) if isinstance(x, torch.Tensor) and x.dim() == 4 else [x])]


@dataclass
class FineTunedModel:
    """A fine-tuned classifier with its classes and evaluation preprocessing.

    ``preprocessing``: ``mean``, ``std`` (3 floats), ``image_size`` S (crop), ``resize`` R (decode size),
    ``interpolation``. ``model`` is in eval mode on ``device``.
    """

    model: nn.Module
    classes: list[str]
    preprocessing: dict[str, Any]
    device: str | torch.device = "cpu"
    channels_last: bool = True
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.model = self.model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    @property
    def resolution(self) -> int:
        """R: images are decoded at R x R, then centre-cropped to ``image_size``."""
        return int(self.preprocessing["resize"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---------------------------------------------------------------- inputs
    def decode(self, image: ImageInput) -> torch.Tensor:
        """One image -> uint8 ``[C, R, R]`` exactly as training decoded files (C = 1 or 3).

        Paths go through :func:`rifle.data.decode_image`; PIL images, numpy arrays (HxW or HxWxC uint8)
        and tensors (uint8 0..255 or float 0..1, ``[C, H, W]``) are decoded the same way from their
        pixels; a uint8 tensor already ``R x R`` is used as is (the training cache's format).
        """
        res = self.resolution
        if isinstance(image, (str, os.PathLike)):
            return decode_image(image, res)
        if isinstance(image, Image.Image):
            return _decode_pil(image, res)
        if isinstance(image, np.ndarray):
            return _decode_pil(Image.fromarray(image), res)
        if isinstance(image, torch.Tensor):
            u8 = _tensor_to_u8(image)
            if tuple(u8.shape[1:]) == (res, res):
                return u8.contiguous()
            arr = u8.permute(1, 2, 0).numpy()
            return _decode_pil(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr), res)
        raise TypeError(f"cannot use a {type(image).__name__} as an image; pass a path, a PIL image, a "
                        f"numpy array or a tensor")

    def normalized_batches(self, decoded: Sequence[torch.Tensor], batch_size: int
                           ) -> Iterator[torch.Tensor]:
        """uint8 ``[C, R, R]`` images -> model input batches (centre crop, normalise; :func:`eval_batches`)."""
        for start in range(0, len(decoded), batch_size):
            chunk = list(decoded[start:start + batch_size])
            if any(t.shape[0] == 3 for t in chunk):  # mixed: store gray as 3 channels (as image folders do)
                chunk = [t.expand(3, -1, -1) for t in chunk]
            ds = ImageTensorSet(torch.stack(chunk), torch.zeros(len(chunk), dtype=torch.int64))
            for x, _ in eval_batches(ds, len(chunk), self.image_size, self.preprocessing["mean"],
                                     self.preprocessing["std"], channels_last=self.channels_last):
                yield x

    def preprocess(self, images: ImageInput | Iterable[ImageInput]) -> torch.Tensor:
        """Model input float ``[N, 3, S, S]`` (CPU) for ``images``."""
        decoded = [self.decode(im) for im in _flatten(images)]
        if not decoded:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.cat(list(self.normalized_batches(decoded, len(decoded))))

    # ---------------------------------------------------------------- outputs
    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, C]`` (CPU, float32) for already-preprocessed input ``[N, 3, S, S]``."""
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()

    def logits_of_decoded(self, decoded: Sequence[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
        outs = [self.logits(x) for x in self.normalized_batches(decoded, batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.num_classes)

    def predict_proba(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """Class probabilities ``[N, C]`` (softmax of the logits), columns in the order of ``classes``."""
        decoded = [self.decode(im) for im in _flatten(images)]
        return self.logits_of_decoded(decoded, batch_size).softmax(1)

    def predict(self, images: ImageInput | Iterable[ImageInput], top_k: int = 1, batch_size: int = 64
                ) -> list[list[tuple[str, float]]]:
        """Per image the ``top_k`` most probable ``(class_name, probability)``, most probable first.

        A single image (path, PIL image, ``[C, H, W]`` tensor) still gives a list of one entry;
        ``top_k`` above the number of classes is capped.
        """
        return self.top_k(self.predict_proba(images, batch_size), top_k)

    def top_k(self, proba: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k must be a positive integer, got {k!r}")
        vals, idx = proba.topk(min(k, self.num_classes), dim=1)
        return [[(self.classes[i], float(v)) for v, i in zip(vr.tolist(), ir.tolist())]
                for vr, ir in zip(vals, idx)]


# ------------------------------------------------------------------------------------ files to predict
def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively; image extensions of :data:`IMAGE_EXTENSIONS`, hidden names
    skipped, sorted) into image paths. Returns ``(paths, problems)``; ``problems`` are ``(path, reason)``
    for inputs that do not exist or folders without images. A file named explicitly is kept whatever its
    extension."""
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(s.startswith(".") for s in f.relative_to(p).parts))
            if not found:
                problems.append((str(item), f"no images in this folder (extensions: {' '.join(IMAGE_EXTENSIONS)})"))
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            problems.append((str(item), "no such file or folder"))
    return paths, problems


# --------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalSplit:
    """A labelled split to evaluate: images uint8 with labels already in the run's class indices."""

    images: ImageTensorSet
    data_classes: list[str]
    name: str
    split: str
    paths: list[str] | None = None
    skipped: list[str] = field(default_factory=list)


def _is_builtin(data: str) -> bool:
    return data.strip().lower() in BUILTIN and "/" not in data and os.sep not in data


def _scan_flat(root: Path) -> dict[str, list[Path]]:
    by_class: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p)):
        imgs = sorted(f for f in d.iterdir() if f.is_file() and not _hidden(f)
                      and f.suffix.lower() in IMAGE_EXTENSIONS)
        if imgs:
            by_class[d.name] = imgs
    return by_class


def _decode_flat(root: Path, res: int, skip_bad_images: bool) -> tuple[ImageTensorSet, list[str], list[str], list[str]]:
    by_class = _scan_flat(root)
    if not by_class:
        raise DataError(f"{root} has no class folders with images; expected ROOT/<class>/<image> or "
                        f"ROOT/{{train,val,test}}/<class>/<image> (extensions {' '.join(IMAGE_EXTENSIONS)}). "
                        f"For unlabelled images use `rifle predict`.")
    classes = list(by_class)
    paths = [p for c in classes for p in by_class[c]]
    labels = [i for i, c in enumerate(classes) for _ in by_class[c]]
    decoded = decode_many(paths, res, desc=f"decoding {root.name}")
    bad = [(p, r) for p, r in zip(paths, decoded) if isinstance(r, Exception)]
    if bad and not skip_bad_images:
        shown = "\n".join(f"  {p}: {type(e).__name__}: {e}" for p, e in bad[:5])
        raise DataError(f"cannot read {len(bad)} image file(s):\n{shown}\nFix or remove them, or pass "
                        f"--skip-bad-images.")
    keep = [i for i, r in enumerate(decoded) if isinstance(r, torch.Tensor)]
    channels = 3 if any(decoded[i].shape[0] == 3 for i in keep) else 1
    imgs = torch.empty((len(keep), channels, res, res), dtype=torch.uint8)
    for j, i in enumerate(keep):
        imgs[j] = decoded[i]
    ds = ImageTensorSet(imgs, torch.tensor([labels[i] for i in keep], dtype=torch.int64))
    return ds, classes, [str(paths[i]) for i in keep], [str(p) for p, _ in bad]


def load_eval_split(fm: FineTunedModel, data: str | os.PathLike, split: str = "test", *,
                    skip_bad_images: bool = False) -> EvalSplit:
    """The labelled images of ``data``'s ``split``, labels mapped onto ``fm.classes``.

    * a built-in name, or a folder with ``train/``/``test/``: the run's own split rules (its seed,
      val_fraction, train_fraction) via :func:`rifle.data.build_data`, so the run's data gives the run's
      splits; ``test`` (and ``val`` when the folder has ``val/``) is read from ``ROOT/<split>/`` alone;
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
            raise DataError(f"{root / split} does not exist; choose --split among "
                            f"{', '.join(s for s in ('train', 'val', 'test') if (root / s).is_dir())}")
        ds, data_classes, paths, skipped = _decode_flat(root / split, res, skip_bad_images)
        name = root.resolve().name
    else:
        bundle = build_data(text, fm.image_size, seed=int(cfg.get("seed", 0)),
                            val_fraction=float(cfg.get("val_fraction", 0.1)),
                            train_fraction=float(cfg.get("train_fraction", 1.0)),
                            skip_bad_images=skip_bad_images)
        ds, data_classes = getattr(bundle, split), bundle.classes
        name, skipped = bundle.info.get("name", text), list(bundle.info.get("skipped", []))
        if len(ds) == 0:
            raise DataError(f"the {split} split of {text} is empty (val_fraction "
                            f"{cfg.get('val_fraction')!r} in the run's config)")
    unknown = [c for c in data_classes if c not in fm.classes]
    if unknown:
        raise DataError(f"--data {text} has classes the run was not trained on: {', '.join(unknown)} "
                        f"(run classes: {', '.join(fm.classes)}). Evaluate on data with the run's classes "
                        f"(a subset is fine)")
    remap = torch.tensor([fm.classes.index(c) for c in data_classes], dtype=torch.int64)
    ds = ImageTensorSet(ds.images, remap[ds.labels])
    return EvalSplit(ds, list(data_classes), str(name), split, paths, skipped)


def classification_metrics(y_true: torch.Tensor, y_pred: torch.Tensor, classes: Sequence[str]
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
    macro = {m: (sum(v[m] for v in present) / len(present) if present else None)
             for m in ("precision", "recall", "f1")}
    n = int(y_true.numel())
    return {"n": n, "accuracy": float(tp.sum()) / n if n else 0.0, "per_class": per_class, "macro": macro,
            "confusion_matrix": cm.tolist()}


def evaluate(fm: FineTunedModel, data: str | os.PathLike | None = None, split: str = "test", *,
             batch_size: int | None = None, skip_bad_images: bool = False) -> dict[str, Any]:
    """Metrics of ``fm`` on ``data``'s ``split`` (default: the run's own data); see
    :func:`classification_metrics`. Also ``loss`` (mean cross-entropy) and per-image ``predictions``
    (predicted index, probability). Same pipeline and batch size as the trainer's evaluation."""
    data = data if data is not None else fm.config.get("data")
    if data is None:
        raise ValueError("no data given and the run's config names none")
    es = load_eval_split(fm, data, split, skip_bad_images=skip_bad_images)
    bs = int(batch_size or fm.config.get("eval_batch_size", 256))
    logits = []
    for x, _ in eval_batches(es.images, bs, fm.image_size, fm.preprocessing["mean"],
                             fm.preprocessing["std"], channels_last=fm.channels_last):
        logits.append(fm.logits(x))
    z = torch.cat(logits) if logits else torch.zeros(0, fm.num_classes)
    y = es.images.labels
    proba = z.softmax(1)
    conf, pred = proba.max(1) if len(z) else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    out = {"run": str(fm.run_dir) if fm.run_dir else None, "epoch": fm.epoch, "data": os.fspath(data),
           "data_name": es.name, "split": es.split, "classes": list(fm.classes),
           **classification_metrics(y, pred, fm.classes),
           "loss": float(F.cross_entropy(z, y, reduction="mean")) if len(z) else None,
           "classes_not_in_data": [c for c in fm.classes if c not in es.data_classes],
           "skipped": es.skipped,
           "predictions": [{"index": i, **({"path": es.paths[i]} if es.paths else {}),
                            "true": fm.classes[int(t)], "predicted": fm.classes[int(p)],
                            "probability": float(c)}
                           for i, (t, p, c) in enumerate(zip(y.tolist(), pred.tolist(), conf.tolist()))]}
    return out


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                   title: str = "") -> None:
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
                ax.text(j, i, str(a[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if a[i, j] > thresh else "black")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
