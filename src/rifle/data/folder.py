"""Image-folder datasets: ``ROOT/{train,test[,val]}/<class>/<image>`` decoded once into uint8 tensors.

The layout rules are checked, with errors that name the offending path (docs/data.md); like
torchvision's ``ImageFolder``, classes are the sorted sub-folder names and EXIF orientation is not applied.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .cache import ImageTensorSet
from .decode import DataError, decode_image, decode_many  # re-exported: their home before disk_cache
from .disk_cache import decode_files

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "LAYOUT",
    "check_unreadable",
    "decode_image",
    "decode_many",
    "folder_fingerprint",
    "load_image_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val", "test")
LAYOUT = (
    "expected layout:\n"
    "  ROOT/train/<class>/<image>   (required)\n"
    "  ROOT/test/<class>/<image>    (required)\n"
    "  ROOT/val/<class>/<image>     (optional; otherwise carved from train)\n"
    f"  images: {' '.join(IMAGE_EXTENSIONS)} (any case), directly inside the class folder"
)


def check_unreadable(
    errors: list[tuple[Path, str]], where: str | os.PathLike, *, skip_bad_images: bool
) -> list[tuple[Path, str]]:
    """``errors`` of :func:`~rifle.data.disk_cache.decode_files`: a :class:`DataError` listing them
    unless ``skip_bad_images``, else a warning with their count (under ``where``). Returns ``errors``."""
    if errors and not skip_bad_images:
        shown = "\n".join(f"  {p}: {msg}" for p, msg in errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DataError(
            f"cannot read {len(errors)} image file(s) (not an image, truncated or corrupt):\n"
            f"{shown}{more}\nFix or remove them, or pass --skip-bad-images "
            f"(skip_bad_images=True) to skip unreadable images."
        )
    if errors:
        warnings.warn(
            f"skipped {len(errors)} unreadable image file(s) under {where} (first: {errors[0][0]})",
            stacklevel=3,
        )
    return errors


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _scan_split(split_dir: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """``{class: sorted image paths}`` and the ignored non-image files of one split folder."""
    classes: dict[str, list[Path]] = {}
    ignored: list[Path] = []
    for d in sorted(p for p in split_dir.iterdir() if _visible(p) and p.is_dir()):
        files = sorted(f for f in d.iterdir() if _visible(f) and f.is_file())
        imgs = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        ignored += [f for f in files if f.suffix.lower() not in IMAGE_EXTENSIONS]
        if not imgs:
            raise DataError(
                f"class folder {d} contains no images (recognised extensions: "
                f"{' '.join(IMAGE_EXTENSIONS)}, files directly inside the folder).\n{LAYOUT}"
            )
        classes[d.name] = imgs
    return classes, ignored


def folder_fingerprint(root: str | os.PathLike) -> dict:
    """``{"root", "files": {"split/class/name": [size, mtime_ns]}}`` of the images a run would load.

    The same files as :func:`load_image_folder` (visible files with an image extension directly in a
    visible class folder of train/, val/, test/), found with ``os.scandir`` and ``stat`` only.
    """
    root = Path(root).expanduser().resolve()
    files: dict[str, list[int]] = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        with os.scandir(root / split) as classes:
            for c in sorted(
                (e for e in classes if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name
            ):
                with os.scandir(c.path) as entries:
                    for e in entries:
                        if (
                            not e.name.startswith(".")
                            and e.is_file()
                            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                        ):
                            st = e.stat()
                            files[f"{split}/{c.name}/{e.name}"] = [st.st_size, st.st_mtime_ns]
    return {"root": str(root), "files": dict(sorted(files.items()))}


def load_image_folder(
    root: str | os.PathLike,
    res: int,
    *,
    skip_bad_images: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, ImageTensorSet], list[str], dict]:
    """Decode ``ROOT/{train,test[,val]}/<class>/*`` at ``res x res``, through the decode cache
    (``cache_dir``: :func:`rifle.data.disk_cache.resolve_cache_dir`; ``"off"`` = in memory).

    Returns ``(splits, classes, info)``: ``splits`` maps "train", "test" and (if present) "val" to an
    :class:`ImageTensorSet`; ``classes`` are the sorted train class folder names (label = position);
    ``info`` holds ``root``, ``counts`` (split -> class -> images), ``skipped`` (unreadable files skipped),
    ``ignored_files`` (non-image files seen), ``missing`` (split -> train classes it lacks), ``channels``
    and ``resolution``. The images are memory-mapped from the cache entry when the cache is on.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist.\n{LAYOUT}")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder.\n{LAYOUT}")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            parent = root.resolve().parent
            hint = ""
            if root.resolve().name in SPLITS and (parent / "train").is_dir():
                hint = (
                    f" {root} looks like the {root.resolve().name}/ split of the dataset {parent}: pass "
                    f"that folder instead (--data {parent})."
                )
            raise DataError(f"missing {split}/ folder: {root / split} does not exist.{hint}\n{LAYOUT}")
    scanned: dict[str, dict[str, list[Path]]] = {}
    ignored: list[Path] = []
    for split in SPLITS:
        if (root / split).is_dir():
            scanned[split], ign = _scan_split(root / split)
            ignored += ign
    classes = list(scanned["train"])
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders.\n{LAYOUT}")
    for split, by_class in scanned.items():
        if not by_class:
            raise DataError(f"{root / split} has no class folders.\n{LAYOUT}")
        extra = [c for c in by_class if c not in scanned["train"]]
        if extra:
            raise DataError(
                f"class folder {root / split / extra[0]} has no counterpart in {root / 'train'} "
                f"(classes only in {split}/: {', '.join(extra)}); every {split} class must also "
                f"be a train class."
            )
    if len(classes) == 1:
        raise DataError(
            f"{root / 'train'} has one class folder ({classes[0]}): nothing to classify (every "
            f"prediction would be {classes[0]!r}, at loss 0 and accuracy 1). A classifier needs "
            f"at least two classes, one folder each.\n{LAYOUT}"
        )
    label_of = {c: i for i, c in enumerate(classes)}

    paths: list[Path] = []
    owners: list[tuple[str, int]] = []
    for split, by_class in scanned.items():
        for c, files in by_class.items():
            paths += files
            owners += [(split, label_of[c])] * len(files)
    dec = decode_files(paths, res, desc=f"decoding {root.name}", cache_dir=cache_dir)
    bad = check_unreadable(dec.errors, root, skip_bad_images=skip_bad_images)
    channels = int(dec.images.shape[1])

    splits: dict[str, ImageTensorSet] = {}
    counts: dict[str, dict[str, int]] = {}
    start = 0
    for split in scanned:  # the paths are in split order: each split is a contiguous block of rows
        stop = start + sum(len(files) for files in scanned[split].values())
        imgs, pos = dec.rows(start, stop)  # a view (of the memory-mapped cache entry), no copy
        start = stop
        labels = torch.tensor([owners[i][1] for i in pos], dtype=torch.int64)
        per_class = torch.bincount(labels, minlength=len(classes)).tolist()
        counts[split] = {c: per_class[label_of[c]] for c in scanned[split]}
        for c in scanned[split]:
            if counts[split][c] == 0:
                raise DataError(
                    f"every image in class folder {root / split / c} is unreadable "
                    f"({len(scanned[split][c])} skipped); remove the folder or fix its images."
                )
        splits[split] = ImageTensorSet(imgs, labels)
    info = {
        "root": str(root),
        "counts": counts,
        "skipped": [str(p) for p, _ in bad],
        "ignored_files": [str(p) for p in ignored],
        "missing": {s: [c for c in classes if c not in scanned[s]] for s in scanned if s != "train"},
        "channels": channels,
        "resolution": res,
    }
    return splits, classes, info
