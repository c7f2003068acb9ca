"""Caltech-256 (Griffin, Holub & Perona, "Caltech-256 Object Category Dataset", Caltech tech. report
CNS-TR-2007-001): 256 object categories plus ``257.clutter`` (excluded), 29,780 images; no official
split: ``--train-per-class N`` draws N training and 20 test images per class with a fixed split seed
(Caltech-256-30 / -60, the protocol of L2-SP and DELTA)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import Reader, SourceIndex, register
from ..folder import IMAGE_EXTENSIONS, DataError

LAYOUT = """\
  ROOT/                   (256_ObjectCategories/, what 256_ObjectCategories.tar extracts to; or its parent)
    001.ak47/001_0001.jpg ...
    ...
    256.toad/256_0001.jpg ...
    257.clutter/          (not a category: excluded)"""

CLASS_DIR = re.compile(r"^(\d{3})\.(.+)$")
CLUTTER = "257"
TEST_PER_CLASS = 20


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and CLASS_DIR.match(d.name)),
        key=lambda d: int(d.name[:3]),
    )
    classes = [d.name for d in dirs if not d.name.startswith(CLUTTER + ".")]
    if not classes:
        raise DataError(f"{READER.title}: no NNN.name class folders in {root}.\n{READER.expected()}")
    numbers = [c[:3] for c in classes]
    if len(set(numbers)) != len(numbers):
        dup = next(n for n in numbers if numbers.count(n) > 1)
        raise DataError(f"{READER.title}: {root} holds several class folders numbered {dup}")
    paths: list[Path] = []
    labels: list[int] = []
    ignored: list[str] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if not f.name.startswith("."))
        images = [f for f in files if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        ignored += [str(f.relative_to(root)) for f in files if f not in images]
        if not images:
            raise DataError(
                f"{READER.title}: class folder {root / name} holds no images.\n{READER.expected()}"
            )
        paths += images
        labels += [label] * len(images)
    return SourceIndex(
        splits={"train": (paths, labels)},
        classes=classes,
        info={
            "protocol": f"no official split: --train-per-class N train + {TEST_PER_CLASS} test per class "
            "(split seed 0); 257.clutter excluded",
            "ignored_files": ignored,
        },
    )


READER = register(
    Reader(
        name="caltech256",
        title="Caltech-256",
        marker="001.ak47",
        layout=LAYOUT,
        read=read,
        test_per_class=TEST_PER_CLASS,
        source="https://data.caltech.edu/records/nyy15-4j048 (256_ObjectCategories.tar)",
    )
)
