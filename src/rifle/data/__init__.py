"""Data for ``rifle``: built-in datasets or an image folder -> train / val / test uint8 tensors.

:func:`build_data` is the single entry point; :func:`train_batches` / :func:`eval_batches` turn an
:class:`ImageTensorSet` into normalised float batches. See ``docs/data.md``.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.seeding import generator
from .builtin import BUILTIN, load_digits_dataset, load_elpv
from .cache import (
    ImageTensorSet,
    cache_resolution,
    eval_batches,
    num_batches,
    samples_per_rank,
    stratified_split,
    train_batches,
)
from .disk_cache import Decoded, decode_files, resolve_cache_dir
from .folder import LAYOUT, DataError, decode_image, folder_fingerprint, load_image_folder
from .published import READERS, parse_spec, published_fingerprint
from .sources import SPLIT_SEED, SplitSource, per_class_split, published_sources

__all__ = [
    "DataBundle",
    "build_data",
    "DataError",
    "ImageTensorSet",
    "train_batches",
    "eval_batches",
    "cache_resolution",
    "num_batches",
    "samples_per_rank",
    "stratified_split",
    "BUILTIN",
    "load_elpv",
    "load_digits_dataset",
    "load_image_folder",
    "decode_image",
    "decode_files",
    "Decoded",
    "resolve_cache_dir",
    "data_fingerprint",
    "compare_fingerprints",
    "label_noise_draws",
    "READERS",
    "parse_spec",
    "per_class_split",
    "SPLIT_SEED",
]

MIN_VAL_IMAGES = 50  # a validation split below this warns: its accuracy moves in steps of over 2 points


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
    return DataError(
        f"unknown dataset {data!r}: not a built-in dataset and no such path.{hint}\n"
        f"Built-in datasets: {', '.join(sorted(BUILTIN))}. Published datasets, read where their archive "
        f"extracted: NAME:ROOT with NAME one of {', '.join(sorted(READERS))} (docs/data.md). "
        "Or pass the path of an image folder;\n"
        f"{LAYOUT}"
    )


def _builtin_name(data: str | os.PathLike) -> str | None:
    """The built-in dataset ``data`` names (see :func:`build_data`), or None for a path."""
    text = os.fspath(data)
    name = text.strip().lower()
    return name if name in BUILTIN and "/" not in text and os.sep not in text else None


def data_fingerprint(data: str | os.PathLike, label_noise: float = 0.0) -> dict:
    """What a run records of its data so that ``--resume`` can tell whether it changed (cheap).

    An image folder: every image file's size and modification time, by ``split/class/name``
    (``os.stat`` only, no image is read). A built-in dataset: its name, the version of the package
    holding it and its number of images. With ``label_noise > 0`` also ``"label_noise": rate`` (the labels
    differ from the data's); at 0 the fingerprint is the one recorded before the option existed.
    """
    fp = _data_fingerprint(data)
    return {**fp, "label_noise": float(label_noise)} if label_noise else fp


def _data_fingerprint(data: str | os.PathLike) -> dict:
    name = _builtin_name(data)
    spec = parse_spec(data) if name is None else None
    if spec is not None:
        return published_fingerprint(spec)
    if name == "elpv":
        from .builtin import _elpv_source

        data_dir, version = _elpv_source()
        with open(data_dir / "labels.csv", encoding="utf-8") as f:
            images = sum(1 for line in f if line.strip())
        return {"kind": "builtin", "name": name, "version": version, "images": images}
    if name == "digits":
        from importlib.metadata import version as dist_version

        from sklearn.datasets import load_digits

        return {
            "kind": "builtin",
            "name": name,
            "version": f"scikit-learn {dist_version('scikit-learn')}",
            "images": len(load_digits().target),
        }
    if name is not None:  # a built-in added later without a fingerprint of its own
        from .. import __version__

        return {"kind": "builtin", "name": name, "version": f"rifle {__version__}", "images": None}
    text = os.fspath(data)
    if not text or not Path(text).expanduser().exists():
        raise _unknown(text)
    return {"kind": "folder", **folder_fingerprint(text)}


def compare_fingerprints(saved: dict, current: dict) -> str | None:
    """None when the data is the one recorded, else what changed, in words."""
    if saved.get("kind") != current.get("kind") or saved.get("name") != current.get("name"):

        def what(fp: dict) -> str:
            return str(fp.get("name")) if fp.get("kind") != "folder" else f"the folder {fp.get('root')}"

        return f"the run used {what(saved)}, --data now names {what(current)}"
    if saved.get("label_noise", 0.0) != current.get("label_noise", 0.0):
        return (
            f"the run's training labels had --label-noise (label_noise) {saved.get('label_noise', 0.0)}, "
            f"now {current.get('label_noise', 0.0)}"
        )
    if current.get("kind") == "published":
        changed = [
            f"{k} {saved.get(k)} -> {current.get(k)}"
            for k in ("options", "root", "images")
            if saved.get(k) != current.get(k)
        ]
        index = [
            f
            for f in sorted(set(saved.get("index_files", {})) | set(current.get("index_files", {})))
            if saved.get("index_files", {}).get(f) != current.get("index_files", {}).get(f)
        ]
        if index:
            changed.append(f"index file(s) {', '.join(index)} changed")
        if not changed and saved.get("images_sha256") != current.get("images_sha256"):
            changed.append("some image files changed (size or time)")
        return (
            f"the dataset {current['name']} changed since the run started: {'; '.join(changed)}"
            if changed
            else None
        )
    if current.get("kind") == "builtin":
        changed = [
            f"{k} {saved.get(k)} -> {current.get(k)}"
            for k in ("version", "images")
            if saved.get(k) != current.get(k)
        ]
        return f"the built-in dataset {current['name']} changed ({', '.join(changed)})" if changed else None
    a, b = saved.get("files", {}), current.get("files", {})
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    changed = sorted(k for k in set(a) & set(b) if list(a[k]) != list(b[k]))
    if not (added or removed or changed):
        return None
    parts = [f"{len(added)} added", f"{len(removed)} removed", f"{len(changed)} changed (size or time)"]
    examples = [
        f"{k} ({how})"
        for how, ks in (("added", added), ("removed", removed), ("changed", changed))
        for k in ks[:3]
    ]
    return (
        f"the data in {current.get('root')} changed since the run started: {', '.join(parts)} image "
        f"file(s), e.g. {', '.join(examples)}"
    )


def _named(names: list[str], limit: int = 6) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def split_warnings(val: ImageTensorSet, test: ImageTensorSet, classes: list[str], val_how: str) -> list[str]:
    """What the splits cannot tell (docs/data.md "Warnings"): a validation split under
    :data:`MIN_VAL_IMAGES` images, and a (non-empty) val or test split without some training class."""
    out = []
    where = "the val/ folder" if val_how == "folder" else f"the validation split ({val_how})"
    more = (
        "a val/ folder with"
        if val_how == "folder"
        else "a larger --val-fraction (val_fraction) or a val/ folder:"
    )
    if 0 < len(val) < MIN_VAL_IMAGES:
        out.append(
            f"{where} has only {len(val)} image{'s' if len(val) != 1 else ''}: validation accuracy "
            f"moves in steps of {100 / len(val):.3g} points, so the epoch it picks (best_val_epoch, "
            f"test_acc_at_best_val) is largely chance; final_test_acc does not use it. Use {more} "
            f"at least {MIN_VAL_IMAGES} images"
        )
    for split, name, ds in (("val", where, val), ("test", "the test split", test)):
        counts = ds.class_counts(len(classes))
        absent = [c for c, n in zip(classes, counts) if n == 0]
        if not len(ds) or not absent:
            continue
        if split == "val":
            out.append(
                f"{name} has no images of {len(absent)} of the {len(classes)} classes "
                f"({_named(absent)}): the best epoch is picked without them. Use {more} "
                f"images of every class"
            )
        else:
            out.append(
                f"{name} has no images of {len(absent)} of the {len(classes)} training classes "
                f"({_named(absent)}): test accuracy does not measure how well they are recognised "
                f"(a test image predicted as one of them still counts as an error)"
            )
    return out


def build_data(
    data: str | os.PathLike,
    image_size: int,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    label_noise: float = 0.0,
    train_per_class: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DataBundle:
    """Load ``data`` (a built-in name, a published dataset's ``NAME:ROOT`` or an image-folder path) at
    ``cache_resolution(image_size)``.

    * A name without a path separator that matches :data:`BUILTIN` (case-insensitive) is the built-in
      dataset, even if a folder of that name exists (write ``./digits`` for the folder).
    * ``NAME[,KEY=VALUE...]:ROOT`` with NAME in :data:`rifle.data.published.READERS` reads a published
      dataset where its archive extracted (docs/data.md "Published datasets").
    * ``train_per_class`` (``--train-per-class N``): N training images per class are kept, the first N of
      a per-class permutation from ``generator(SPLIT_SEED, "train-per-class")`` (a fixed seed: the same
      images for every run seed); a dataset without an official split (caltech256) takes its test images
      from the next ones of the same permutation. The other training images are "left over".
    * Validation: the data's own validation split when it has one (a ``val/`` folder, an official split),
      else ``val_fraction`` carved, stratified by class, from ``generator(seed, "split")``: from the
      left-over training images when ``train_per_class`` left some (the N stay whole), else from train
      (every class keeps >= 1 train image; ``val_fraction = 0`` gives an empty val set).
    * Then ``train_fraction`` of the remaining train is kept, stratified, from ``generator(seed, "fraction")``
      (>= 1 image per class; per class a smaller fraction keeps a prefix of the same random order).
    * The test split is never touched. Same seed -> identical splits; the test split of the built-in
      datasets is fixed for every seed.
    * ``label_noise`` (after the splits, which it does not change): each train and val label replaced,
      with that probability, by a class drawn uniformly among the other classes (:func:`label_noise_draws`;
      docs/data.md "Label noise"). ``info["label_noise"]`` records it, also at rate 0.
    * ``cache_dir``: where decoded images are kept (:func:`resolve_cache_dir`: None = ``$RIFLE_CACHE_DIR``
      or ``~/.cache/rifle``, ``"off"`` = in memory); it never changes the data (docs/data.md "Decode cache").
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if not _is_number(val_fraction) or not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not _is_number(train_fraction) or not 0 < train_fraction <= 1:
        raise DataError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    if not _is_number(label_noise) or not 0 <= label_noise < 1:
        raise DataError(f"label_noise (--label-noise) must be in [0, 1), got {label_noise!r}")
    if train_per_class is not None and (
        isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 1
    ):
        raise DataError(
            f"train_per_class (--train-per-class) must be a positive integer, got {train_per_class!r}"
        )
    res = cache_resolution(image_size)
    text = os.fspath(data)
    name = text.strip().lower()
    spec = parse_spec(text) if not _builtin_name(data) else None
    sources: dict[str, SplitSource]
    test_per_class = None
    if _builtin_name(data):
        splits, classes, src_info = BUILTIN[name](res, cache_dir=cache_dir)
        sources = {s: SplitSource.of(ds) for s, ds in splits.items()}
        source = "builtin"
    elif spec is not None:
        sources, classes, src_info = published_sources(
            spec, res, skip_bad_images=skip_bad_images, cache_dir=cache_dir, whole=not train_per_class
        )
        name, source = spec.label, f"published {spec.reader.title} {src_info['root']}"
        test_per_class = spec.reader.test_per_class
        if test_per_class and not train_per_class:
            raise DataError(
                f"{spec.reader.title} has no official train/test split: pass --train-per-class N "
                f"(train_per_class; the L2-SP/DELTA protocol uses 30 or 60), and {test_per_class} further "
                f"images per class become the test split"
            )
    elif text and Path(text).expanduser().exists():
        splits, classes, src_info = load_image_folder(
            text, res, skip_bad_images=skip_bad_images, cache_dir=cache_dir
        )
        sources = {s: SplitSource.of(ds) for s, ds in splits.items()}
        name, source = Path(text).expanduser().resolve().name, f"folder {Path(text).expanduser().resolve()}"
    else:
        raise _unknown(text)

    src = sources["train"]
    k = len(classes)
    if label_noise and k < 2:
        raise DataError(f"--label-noise {label_noise:g} needs at least 2 classes; {text} has {k}")
    # noise per image of the source's train split (its position there), drawn before any split
    flip, offset = label_noise_draws(len(src.labels), k, label_noise, seed)
    notes: list[str] = []
    per_class_info = None
    pool = torch.arange(len(src.labels))  # the training images, by position in the source's train split
    spare = torch.zeros(0, dtype=torch.int64)  # left over by train_per_class
    if train_per_class:
        pool, test_pos, spare, short = per_class_split(src.labels, train_per_class, test_per_class or 0)
        per_class_info = {
            "n": train_per_class,
            "split_seed": SPLIT_SEED,
            "kept": len(pool),
            "left_over": len(spare),
            "short_classes": [classes[c] for c in short],
        }
        if short:
            notes.append(
                f"--train-per-class {train_per_class}: {len(short)} of the {k} classes have fewer training "
                f"images ({_named([classes[c] for c in short])}); all of theirs are kept"
                + (f", and fewer than {test_per_class} test images" if test_per_class else "")
            )
    test = src.take(test_pos) if test_per_class else sources["test"].take(None)
    if "val" in sources:
        val = sources["val"].take(None)
        val_how = "folder" if source.startswith("folder") else "official"
        val_flip, val_offset = label_noise_draws(len(val), k, label_noise, seed, 1)
    else:
        if len(spare):
            taken, _ = stratified_split(src.labels[spare], val_fraction, generator(seed, "split"))
            val_pos = spare[taken]
            val_how = (
                f"carved {val_fraction * 100:g}% stratified seed {seed} from the {len(spare)} training "
                f"images --train-per-class left over"
            )
        else:
            val_idx, train_idx = stratified_split(
                src.labels[pool], val_fraction, generator(seed, "split"), min_left=1
            )
            val_pos, pool = pool[val_idx], pool[train_idx]
            val_how = f"carved {val_fraction * 100:g}% stratified seed {seed}"
        val = src.take(val_pos)
        val_pos = src.kept(val_pos)
        val_flip, val_offset = flip[val_pos], offset[val_pos]
    if train_fraction < 1:
        keep, _ = stratified_split(src.labels[pool], train_fraction, generator(seed, "fraction"), min_taken=1)
        pool = pool[keep]
    train = src.take(pool)
    pool = src.kept(pool)
    train = _relabel(train, flip[pool], offset[pool], k)
    val = _relabel(val, val_flip, val_offset, k)
    noise = {
        "rate": float(label_noise),
        "flipped": int(flip[pool].sum()) + int(val_flip.sum()),
        "of": len(train) + len(val),
        "labels_sha256": labels_sha256(train.labels),
    }

    notes += split_warnings(val, test, list(classes), val_how)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    info = {
        "name": name,
        "source": source,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "class_counts": {s: ds.class_counts(k) for s, ds in (("train", train), ("val", val), ("test", test))},
        "val": val_how,
        "val_fraction": val_fraction if val_how not in ("folder", "official") else None,
        "train_fraction": train_fraction,
        "label_noise": noise,
        "seed": seed,
        "skipped": list(src_info.get("skipped", [])),
        "image_size": image_size,
        "cache_resolution": res,
        "channels": train.channels,
        "source_info": src_info,
        "warnings": notes,
    }
    if per_class_info is not None:
        info["train_per_class"] = per_class_info
    return DataBundle(train=train, val=val, test=test, classes=list(classes), info=info)


def label_noise_draws(
    n: int, num_classes: int, rate: float, seed: int, *index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flip, offset)`` for ``n`` labels from ``generator(seed, "label-noise", *index)``: ``flip[i]`` with
    probability ``rate`` (``rand(n) < rate``), then ``offset[i]`` uniform in ``1..C-1`` (``randint``); a
    flipped label ``y`` becomes ``(y + offset) % C``, uniform among the other classes. Both are drawn for
    every label whatever the rate, so label ``i``'s draw depends on ``(seed, i)`` only."""
    if not rate or num_classes < 2:
        return torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.int64)
    g = generator(seed, "label-noise", *index)
    flip = torch.rand(n, generator=g) < rate
    offset = torch.randint(1, num_classes, (n,), generator=g)
    return flip, offset


def _relabel(ds: ImageTensorSet, flip: torch.Tensor, offset: torch.Tensor, k: int) -> ImageTensorSet:
    """``ds`` with the flipped labels moved by ``offset`` (mod ``k``); a new set, the images shared."""
    if not bool(flip.any()):
        return ds
    labels = torch.where(flip, (ds.labels + offset) % k, ds.labels)
    return ds.with_labels(labels)


def labels_sha256(labels: torch.Tensor) -> str:
    """SHA-256 of ``labels`` as int64 little-endian bytes, in the split's order."""
    return hashlib.sha256(labels.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()
