"""Stanford Dogs (Khosla et al., "Novel dataset for fine-grained image categorization", FGVC workshop at
CVPR 2011): 120 dog breeds from ImageNet, official split from ``train_list.mat`` / ``test_list.mat``
(12,000 train, 100 per class / 8,580 test). torchvision has no reader for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import Reader, SourceIndex, missing_images, read_mat, register, require
from ..folder import DataError

LAYOUT = """\
  ROOT/                       (the folder images.tar and lists.tar were both extracted in)
    train_list.mat            file_list (paths under Images/), labels (1..120)   [lists.tar]
    test_list.mat             the same for the test split                        [lists.tar]
    Images/<wnid>-<breed>/<image>.jpg, e.g. Images/n02085620-Chihuahua/n02085620_5927.jpg  [images.tar]"""


def _split(path: Path) -> tuple[list[str], list[int]]:
    mat = read_mat(READER, path)
    for key in ("file_list", "labels"):
        if key not in mat:
            raise DataError(f"{READER.title}: {path} has no '{key}' variable.\n{READER.expected()}")
    files = [str(f).strip() for f in np.atleast_1d(mat["file_list"]).ravel()]
    labels = [int(y) for y in np.atleast_1d(mat["labels"]).ravel()]
    if len(files) != len(labels):
        raise DataError(f"{READER.title}: {path} lists {len(files)} files but {len(labels)} labels")
    return files, labels


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    files = require(READER, root, "train_list.mat", "test_list.mat", "Images")
    lists = {"train": _split(files[0]), "test": _split(files[1])}
    # class names: the breed folder of each label (label l -> Images/<folder>/...), checked consistent
    folder_of: dict[int, str] = {}
    for rels, labels in lists.values():
        for rel, y in zip(rels, labels):
            folder = rel.replace("\\", "/").split("/")[0]
            if folder_of.setdefault(y, folder) != folder:
                raise DataError(
                    f"{READER.title}: label {y} is both {folder_of[y]!r} and {folder!r} "
                    f"({files[0]}, {files[1]})"
                )
    k = max(folder_of)
    absent = sorted(set(range(1, k + 1)) - set(folder_of))
    if min(folder_of) < 1 or absent:
        bad = min(folder_of) if min(folder_of) < 1 else absent[0]
        raise DataError(
            f"{READER.title}: labels must be 1..{k}; label {bad} has no image in {files[0]} or {files[1]}"
        )
    out: dict[str, tuple[list[Path], list[int]]] = {}
    for (split, (rels, labels)), index_file in zip(lists.items(), files):
        out[split] = ([root / "Images" / rel for rel in rels], [y - 1 for y in labels])
        missing_images(READER, out[split][0], index_file)
    return SourceIndex(
        splits=out,
        classes=[folder_of[y] for y in range(1, k + 1)],
        info={"protocol": "official train_list.mat / test_list.mat (lists.tar)"},
        index_files=files[:2],
    )


READER = register(
    Reader(
        name="stanford_dogs",
        title="Stanford Dogs",
        marker="train_list.mat",
        layout=LAYOUT,
        read=read,
        source="http://vision.stanford.edu/aditya86/ImageNetDogs/ (images.tar, lists.tar)",
    )
)
