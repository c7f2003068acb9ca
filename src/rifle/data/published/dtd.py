"""DTD, the Describable Textures Dataset (Cimpoi et al., "Describing textures in the wild", CVPR 2014):
47 texture classes, 120 images each; ten official partitions (``partition=1..10``, default 1), each
with train / val / test of 40 images per class (1,880 each); the official val split is used. Ours, not
torchvision's ``DTD``, which reads ``<root>/dtd/dtd/`` (where its download extracts), not the folder the
archive extracts to (docs/data.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Reader, SourceIndex, missing_images, read_lines, register, require
from ..folder import DataError

LAYOUT = """\
  ROOT/                       (dtd/, what dtd-r1.0.1.tar.gz extracts to)
    images/<class>/<image>.jpg      47 class folders, e.g. images/banded/banded_0002.jpg
    labels/train1.txt ... train10.txt   <class>/<image>.jpg, one a line (partition N: trainN.txt)
    labels/val1.txt ... val10.txt
    labels/test1.txt ... test10.txt"""


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    n = options["partition"]
    files = require(
        READER, root, f"labels/train{n}.txt", f"labels/val{n}.txt", f"labels/test{n}.txt", "images"
    )
    classes = sorted(p.name for p in files[3].iterdir() if p.is_dir() and not p.name.startswith("."))
    label_of = {c: i for i, c in enumerate(classes)}
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    for split, path in zip(("train", "val", "test"), files):
        paths, labels = [], []
        for i, line in enumerate(read_lines(READER, path), 1):
            cls, sep, name = line.partition("/")
            if not sep or not name:
                raise DataError(
                    f"{READER.title}: {path} line {i}: expected '<class>/<image>.jpg', got {line!r}"
                )
            if cls not in label_of:
                raise DataError(
                    f"{READER.title}: {path} line {i}: class {cls!r} has no folder in {files[3]}."
                    f"\n{READER.expected()}"
                )
            paths.append(files[3] / cls / name)
            labels.append(label_of[cls])
        missing_images(READER, paths, path)
        splits[split] = (paths, labels)
    return SourceIndex(
        splits=splits,
        classes=classes,
        info={
            "protocol": f"official partition {n}: labels/train{n}.txt, val{n}.txt, test{n}.txt",
            "partition": n,
        },
        index_files=files[:3],
    )


READER = register(
    Reader(
        name="dtd",
        title="DTD",
        marker="labels/train1.txt",
        layout=LAYOUT,
        read=read,
        options={"partition": 1},
        choices={"partition": range(1, 11)},
        official_val=True,
        source="https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz)",
    )
)
