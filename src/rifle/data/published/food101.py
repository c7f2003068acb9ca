"""Food-101 (Bossard, Guillaumin & Van Gool, "Food-101 - Mining Discriminative Components with Random
Forests", ECCV 2014): 101 dishes, official split ``meta/train.json`` / ``meta/test.json`` (750 / 250 per
class: 75,750 / 25,250), read by torchvision's ``Food101`` (``download=False``: no download, no MD5
check). Food-101-30 is ``--train-per-class 30``; the test split stays the full official one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Reader, SourceIndex, missing_images, register, require
from ..folder import DataError

LAYOUT = """\
  ROOT/                   (food-101/, what food-101.tar.gz extracts to; torchvision's Food101 needs this name)
    meta/train.json       {"<class>": ["<class>/<id>", ...]} (meta/train.txt lists the same, one a line)
    meta/test.json
    meta/classes.txt      <class>, one a line (apple_pie, ...)
    images/<class>/<id>.jpg"""


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    files = require(READER, root, "meta/train.json", "meta/test.json", "images")
    if root.name != "food-101":
        raise DataError(
            f"{READER.title}: {root} holds the dataset but torchvision's Food101 reader needs the "
            f"folder to be named food-101 (as food-101.tar.gz extracts): rename it.\n{READER.expected()}"
        )
    from torchvision.datasets import Food101

    splits: dict[str, tuple[list[Path], list[int]]] = {}
    classes: list[str] = []
    for split, index_file in zip(("train", "test"), files):
        try:  # download=False: reads meta/<split>.json under ROOT's parent/food-101 (no MD5 check)
            ds = Food101(str(root.parent), split=split, download=False)
        except Exception as e:  # noqa: BLE001 - a damaged json gives JSONDecodeError, AttributeError, ...
            raise DataError(
                f"{READER.title}: torchvision's Food101 cannot read {index_file} ({type(e).__name__}: {e})."
                f"\n{READER.expected()}"
            ) from None
        if classes and ds.classes != classes:
            raise DataError(f"{READER.title}: {files[0]} and {files[1]} name different classes")
        classes = list(ds.classes)
        paths = [Path(p) for p in ds._image_files]  # torchvision 0.29's attributes (images/<class>/<id>.jpg)
        splits[split] = (paths, [int(y) for y in ds._labels])
        missing_images(READER, paths, index_file)
    return SourceIndex(
        splits=splits,
        classes=classes,
        info={"protocol": "official meta/train.json / meta/test.json", "reader": "torchvision Food101"},
        index_files=files[:2],
    )


READER = register(
    Reader(
        name="food101",
        title="Food-101",
        marker="meta/train.json",
        layout=LAYOUT,
        read=read,
        source="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz)",
    )
)
