"""Use a fine-tuned run: :func:`load` its folder into a :class:`FineTunedModel` and predict images
(:func:`find_images` expands the files and folders to predict); evaluation: :mod:`rifle.evaluation`.

Weights are read only from safetensors (nothing is unpickled, nothing is downloaded) and images go
through the run's own evaluation transform, bit for bit (docs/inference.md).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from .data import ImageTensorSet, cache_resolution, decode_image, eval_batches
from .data.folder import IMAGE_EXTENSIONS
from .train.checkpoint import WEIGHTS, CheckpointError, load_weights, read_weights
from .train.outputs import CONFIG, SUMMARY

__all__ = ["FineTunedModel", "load", "NotARunError", "RunError", "ImageInput", "find_images"]

ImageInput = str | os.PathLike | Image.Image | torch.Tensor | np.ndarray
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
        raise NotARunError(
            f"{path} is not a run folder: missing {', '.join(missing)} (a run made by "
            f"`rifle train --out {path}` holds {', '.join(REQUIRED)}, {SUMMARY}, ...)"
        )
    return path


def load(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> FineTunedModel:
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
        raise RunError(
            f"{path / SUMMARY} classes {summary['classes']} differ from the checkpoint's "
            f"{classes}; the folder mixes two runs"
        )
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
    prep = summary.get("preprocessing") or {
        **model_preprocessing(model),
        "image_size": image_size,
        "resize": cache_resolution(image_size),
    }
    prep = {**prep, "mean": [float(v) for v in prep["mean"]], "std": [float(v) for v in prep["std"]]}
    if int(prep["image_size"]) != image_size or int(prep["resize"]) != cache_resolution(image_size):
        raise RunError(f"{path / SUMMARY}: preprocessing {prep} does not match image_size {image_size}")
    epoch = int(meta["epoch"]) if str(meta.get("epoch", "")).isdigit() else None
    return FineTunedModel(
        model,
        classes,
        prep,
        device=device,
        channels_last=bool(config.get("channels_last", True)),
        run_dir=path,
        config=config,
        summary=summary,
        epoch=epoch,
    )


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
        raise ValueError(
            f"an image tensor must be [C, H, W] or [N, C, H, W] with C = 1 or 3 (or [H, W]); "
            f"got shape {tuple(t.shape)}"
        )
    if t.dtype == torch.uint8:
        return t
    if not t.dtype.is_floating_point:
        raise ValueError(f"image tensors must be uint8 (0..255) or float (0..1), got {t.dtype}")
    lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"a float image tensor must hold pixel values in [0, 1] (as torchvision's "
            f"ToTensor gives), got [{lo:.3g}, {hi:.3g}]; for already-normalised model input "
            f"call FineTunedModel.logits(x)"
        )
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
        raise TypeError(
            f"cannot use a {type(image).__name__} as an image; pass a path, a PIL image, a "
            f"numpy array or a tensor"
        )

    def normalized_batches(self, decoded: Sequence[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 ``[C, R, R]`` images -> model input batches (centre crop, normalise;
        :func:`eval_batches`)."""
        for start in range(0, len(decoded), batch_size):
            chunk = list(decoded[start : start + batch_size])
            if any(t.shape[0] == 3 for t in chunk):  # mixed: store gray as 3 channels (as image folders do)
                chunk = [t.expand(3, -1, -1) for t in chunk]
            ds = ImageTensorSet(torch.stack(chunk), torch.zeros(len(chunk), dtype=torch.int64))
            for x, _ in eval_batches(
                ds,
                len(chunk),
                self.image_size,
                self.preprocessing["mean"],
                self.preprocessing["std"],
                channels_last=self.channels_last,
            ):
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

    def predict(
        self, images: ImageInput | Iterable[ImageInput], top_k: int = 1, batch_size: int = 64
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
        return [
            [(self.classes[i], float(v)) for v, i in zip(vr.tolist(), ir.tolist())]
            for vr, ir in zip(vals, idx)
        ]


# ------------------------------------------------------------------------------------ files to predict
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
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(s.startswith(".") for s in f.relative_to(p).parts)
            )
            if not found:
                problems.append(
                    (str(item), f"no images in this folder (extensions: {' '.join(IMAGE_EXTENSIONS)})")
                )
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            problems.append((str(item), "no such file or folder"))
    return paths, problems
