"""FGVC-Aircraft (Maji et al., "Fine-grained visual classification of aircraft", arXiv:1306.5151, 2013):
10,000 images, official split trainval 6,667 / test 3,333; labels at the variant level (100 classes,
default) or, with ``level=family`` / ``level=manufacturer``, the coarser levels of its hierarchy. Ours,
parsing the same files as torchvision's ``FGVCAircraft``, which reads only a folder named
``fgvc-aircraft-2013b`` (docs/data.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Reader, SourceIndex, missing_images, read_lines, register, require
from ..folder import DataError

LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}

LAYOUT = """\
  ROOT/                                   (fgvc-aircraft-2013b/, what fgvc-aircraft-2013b.tar.gz extracts to)
    data/variants.txt                     one class name a line (families.txt, manufacturers.txt: level=...)
    data/images_variant_trainval.txt      <image id> <variant name>   (images_family_*, images_manufacturer_*)
    data/images_variant_test.txt          <image id> <variant name>
    data/images/<image id>.jpg"""


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    level = options["level"]
    files = require(
        READER,
        root,
        f"data/{LEVELS[level]}",
        f"data/images_{level}_trainval.txt",
        f"data/images_{level}_test.txt",
        "data/images",
    )
    classes = read_lines(READER, files[0])
    label_of = {c: i for i, c in enumerate(classes)}
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    for split, path in (("train", files[1]), ("test", files[2])):
        paths, labels = [], []
        for i, line in enumerate(read_lines(READER, path), 1):
            image_id, _, name = line.partition(" ")
            name = name.strip()
            if not name:
                raise DataError(
                    f"{READER.title}: {path} line {i}: expected '<image id> <{level}>', got {line!r}"
                )
            if name not in label_of:
                raise DataError(f"{READER.title}: {path} line {i}: {name!r} is not a class of {files[0]}")
            paths.append(root / "data" / "images" / f"{image_id}.jpg")
            labels.append(label_of[name])
        missing_images(READER, paths, path)
        splits[split] = (paths, labels)
    return SourceIndex(
        splits=splits,
        classes=classes,
        info={"protocol": f"official trainval / test ({level} level)", "level": level},
        index_files=files[:3],
    )


READER = register(
    Reader(
        name="fgvc_aircraft",
        title="FGVC-Aircraft",
        marker="data/variants.txt",
        layout=LAYOUT,
        read=read,
        options={"level": "variant"},
        choices={"level": tuple(LEVELS)},
        source="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)",
    )
)
