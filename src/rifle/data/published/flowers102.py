"""Oxford 102 Flowers (Nilsback & Zisserman, "Automated Flower Classification over a Large Number of
Classes", ICVGIP 2008): 8,189 images of 102 flower species, official split ``setid.mat`` (train 1,020 /
val 1,020 / test 6,149; 10 train and 10 val images per class), labels ``imagelabels.mat`` (1..102).
The dataset ships no class names: they are torchvision's ``Flowers102.classes`` list (label order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import Reader, SourceIndex, missing_images, read_mat, register, require
from ..folder import DataError

LAYOUT = """\
  ROOT/                   the folder holding jpg/ and the two .mat files:
    jpg/image_00001.jpg ... image_08189.jpg   (what 102flowers.tgz extracts)
    imagelabels.mat       'labels': 1 x 8189, the class (1..102) of image i  \\ downloaded separately:
    setid.mat             'trnid', 'valid', 'tstid': image numbers (1-based)  / put them beside jpg/"""

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def _ints(path: Path, mat: dict[str, Any], key: str) -> list[int]:
    if key not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise DataError(f"{READER.title}: {path} has no {key!r} (it has: {keys}).\n{READER.expected()}")
    a = np.atleast_1d(np.asarray(mat[key]))
    if a.ndim != 1 or a.dtype.kind not in "iuf" or not np.all(a == np.round(a)):
        raise DataError(f"{READER.title}: {path}: {key!r} is not a list of integers.\n{READER.expected()}")
    return [int(x) for x in a]


def class_names(k: int) -> list[str]:
    """torchvision's 102 names (public class attribute; no dataset is instantiated, so no MD5 check)
    when there are 102 labels, else the label numbers ("001", ...)."""
    from torchvision.datasets import Flowers102

    names = list(Flowers102.classes)
    return names if k == len(names) else [f"{i:03d}" for i in range(1, k + 1)]


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    labels_file, setid_file, _ = require(READER, root, "imagelabels.mat", "setid.mat", "jpg")
    labels = _ints(labels_file, read_mat(READER, labels_file), "labels")
    setid = read_mat(READER, setid_file)
    if not labels or min(labels) < 1:
        raise DataError(f"{READER.title}: {labels_file}: 'labels' must be class numbers from 1")
    k = max(labels)
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    for split, key in SPLIT_KEYS.items():
        ids = _ints(setid_file, setid, key)
        bad = [i for i in ids if not 1 <= i <= len(labels)]
        if bad:
            raise DataError(
                f"{READER.title}: {setid_file}: {key!r} names image {bad[0]} but {labels_file} labels "
                f"images 1..{len(labels)}"
            )
        paths = [root / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        missing_images(READER, paths, f"{setid_file} ({key!r})")
        splits[split] = (paths, [labels[i - 1] - 1 for i in ids])
    return SourceIndex(
        splits=splits,
        classes=class_names(k),
        info={
            "protocol": "official setid.mat trnid / valid / tstid (val: the official validation split)",
            "class_names": "torchvision Flowers102.classes" if k == 102 else "label numbers",
        },
        index_files=[labels_file, setid_file],
    )


READER = register(
    Reader(
        name="flowers102",
        title="Oxford 102 Flowers",
        marker="setid.mat",
        layout=LAYOUT,
        read=read,
        official_val=True,
        source="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ "
        "(102flowers.tgz, imagelabels.mat, setid.mat)",
    )
)
