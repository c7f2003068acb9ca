"""CUB-200-2011 (Wah et al., Caltech tech. report CNS-TR-2011-001): 200 bird species, official split
from ``train_test_split.txt`` (5,994 train / 5,794 test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Reader, SourceIndex, missing_images, read_lines, register, require
from ..folder import DataError

LAYOUT = """\
  ROOT/                       (CUB_200_2011/, what CUB_200_2011.tgz extracts to)
    images.txt                <image_id> <path under images/>
    image_class_labels.txt    <image_id> <class_id, 1..200>
    train_test_split.txt      <image_id> <1 train | 0 test>
    classes.txt               <class_id> <class name, e.g. 001.Black_footed_Albatross>
    images/<class name>/<image>.jpg"""


def _pairs(reader: Reader, path: Path) -> dict[str, str]:
    out = {}
    for i, line in enumerate(read_lines(reader, path), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{reader.title}: {path} line {i}: expected '<id> <value>', got {line!r}")
        out[parts[0]] = parts[1]
    return out


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    files = require(
        READER, root, "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images"
    )
    images, labels, split, classes = (_pairs(READER, p) for p in files[:4])
    class_ids = sorted(classes, key=int)
    label_of = {cid: i for i, cid in enumerate(class_ids)}
    out: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "test": ([], [])}
    for image_id, rel in sorted(images.items(), key=lambda kv: int(kv[0])):
        if image_id not in labels or image_id not in split:
            where = files[1] if image_id not in labels else files[2]
            raise DataError(f"{READER.title}: image {image_id} ({rel}) is not in {where}")
        if labels[image_id] not in label_of:
            raise DataError(f"{READER.title}: image {image_id}: class {labels[image_id]} not in {files[3]}")
        s = "train" if split[image_id].strip() == "1" else "test"
        out[s][0].append(root / "images" / rel)
        out[s][1].append(label_of[labels[image_id]])
    missing_images(READER, out["train"][0] + out["test"][0], files[0])
    return SourceIndex(
        splits=out,
        classes=[classes[c] for c in class_ids],
        info={"protocol": "official train_test_split.txt"},
        index_files=files[:4],
    )


READER = register(
    Reader(
        name="cub200",
        title="CUB-200-2011",
        marker="image_class_labels.txt",
        layout=LAYOUT,
        read=read,
        source="https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    )
)
