"""Data for ``rifle``: built-in datasets or an image folder -> train / val / test uint8 tensors.

:func:`build_data` is the single entry point; :func:`train_batches` / :func:`eval_batches` turn an
:class:`ImageTensorSet` into normalised float batches. See ``docs/data.md``.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.seeding import generator
from .builtin import BUILTIN, load_digits_dataset, load_elpv
from .cache import (ImageTensorSet, cache_resolution, eval_batches, num_batches, samples_per_rank,
                    stratified_split, train_batches)
from .folder import LAYOUT, DataError, decode_image, load_image_folder

__all__ = ["DataBundle", "build_data", "DataError", "ImageTensorSet", "train_batches", "eval_batches",
           "cache_resolution", "num_batches", "samples_per_rank", "stratified_split", "BUILTIN",
           "load_elpv", "load_digits_dataset", "load_image_folder", "decode_image"]


@dataclass
class DataBundle:
    """The three splits of one run, the class names, and how they were obtained (``info``)."""

    train: ImageTensorSet
    val: ImageTensorSet
    test: ImageTensorSet
    classes: list[str]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _unknown(data: str) -> DataError:
    close = difflib.get_close_matches(data.lower(), list(BUILTIN), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return DataError(f"unknown dataset {data!r}: not a built-in dataset and no such path.{hint}\n"
                     f"Built-in datasets: {', '.join(sorted(BUILTIN))}. "
                     "Or pass the path of an image folder;\n"
                     f"{LAYOUT}")


def build_data(data: str | os.PathLike, image_size: int, *, seed: int = 0, val_fraction: float = 0.1,
               train_fraction: float = 1.0, skip_bad_images: bool = False) -> DataBundle:
    """Load ``data`` (a built-in name or an image-folder path) at ``cache_resolution(image_size)``.

    * A name without a path separator that matches :data:`BUILTIN` (case-insensitive) is the built-in
      dataset, even if a folder of that name exists (write ``./digits`` for the folder).
    * Validation: the folder's ``val/`` when it has one, else ``val_fraction`` of train carved off,
      stratified by class, from ``generator(seed, "split")`` (every class keeps >= 1 train image;
      ``val_fraction = 0`` gives an empty val set).
    * Then ``train_fraction`` of the remaining train is kept, stratified, from ``generator(seed, "fraction")``
      (>= 1 image per class; per class a smaller fraction keeps a prefix of the same random order).
    * The test split is never touched. Same seed -> identical splits; the test split of the built-in
      datasets is fixed for every seed.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if not _is_number(val_fraction) or not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not _is_number(train_fraction) or not 0 < train_fraction <= 1:
        raise DataError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    res = cache_resolution(image_size)
    text = os.fspath(data)
    name = text.strip().lower()
    if name in BUILTIN and "/" not in text and os.sep not in text:
        splits, classes, src_info = BUILTIN[name](res)
        source = "builtin"
    elif text and Path(text).expanduser().exists():
        splits, classes, src_info = load_image_folder(text, res, skip_bad_images=skip_bad_images)
        name, source = Path(text).expanduser().resolve().name, f"folder {Path(text).expanduser().resolve()}"
    else:
        raise _unknown(text)

    train, test = splits["train"], splits["test"]
    if "val" in splits:
        val = splits["val"]
        val_how = "folder"
    else:
        val_idx, train_idx = stratified_split(train.labels, val_fraction, generator(seed, "split"),
                                              min_left=1)
        val, train = train.subset(val_idx), train.subset(train_idx)
        val_how = f"carved {val_fraction * 100:g}% stratified seed {seed}"
    if train_fraction < 1:
        keep, _ = stratified_split(train.labels, train_fraction, generator(seed, "fraction"), min_taken=1)
        train = train.subset(keep)

    k = len(classes)
    info = {
        "name": name,
        "source": source,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "class_counts": {s: ds.class_counts(k) for s, ds in (("train", train), ("val", val), ("test", test))},
        "val": val_how,
        "val_fraction": val_fraction if val_how != "folder" else None,
        "train_fraction": train_fraction,
        "seed": seed,
        "skipped": list(src_info.get("skipped", [])),
        "image_size": image_size,
        "cache_resolution": res,
        "channels": train.channels,
        "source_info": src_info,
    }
    return DataBundle(train=train, val=val, test=test, classes=list(classes), info=info)
