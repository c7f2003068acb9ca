"""Oxford-IIIT Pet (Parkhi, Vedaldi, Zisserman & Jawahar, "Cats and Dogs", CVPR 2012): 37 cat and dog
breeds, official split ``annotations/trainval.txt`` / ``annotations/test.txt`` (3,680 / 3,669). Class
names are the image names' breed part (``Abyssinian``, ``american_bulldog``, ...) in class-id order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Reader, SourceIndex, missing_images, read_lines, register, require
from ..folder import DataError

LAYOUT = """\
  ROOT/                   the folder images.tar.gz and annotations.tar.gz extract to:
    images/<Breed_name>_<n>.jpg
    annotations/trainval.txt   <image name without .jpg> <class id 1..37> <species 1 cat | 2 dog> <breed id>
    annotations/test.txt       (lines starting with '#' are comments)"""


def _parse(path: Path) -> list[tuple[str, int]]:
    out = []
    for i, line in enumerate(read_lines(READER, path), 1):
        if line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
            raise DataError(
                f"{READER.title}: {path} line {i}: expected '<image> <class id> <species> <breed id>', "
                f"got {line!r}"
            )
        out.append((parts[0], int(parts[1])))
    return out


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    files = require(READER, root, "annotations/trainval.txt", "annotations/test.txt", "images")
    listed = {s: _parse(f) for s, f in zip(("train", "test"), files)}
    names: dict[int, str] = {}
    for split, f in zip(listed, files):
        for image, cid in listed[split]:
            breed = image.rsplit("_", 1)[0]
            if names.setdefault(cid, breed) != breed:
                raise DataError(
                    f"{READER.title}: {f}: class {cid} is {names[cid]!r} and {breed!r} (image {image})"
                )
    absent = [c for c in range(1, max(names) + 1) if c not in names]
    if absent:
        raise DataError(f"{READER.title}: class id {absent[0]} has no image in {files[0]} or {files[1]}")
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    for split, f in zip(listed, files):
        paths = [root / "images" / f"{image}.jpg" for image, _ in listed[split]]
        missing_images(READER, paths, f)
        splits[split] = (paths, [cid - 1 for _, cid in listed[split]])
    return SourceIndex(
        splits=splits,
        classes=[names[c] for c in sorted(names)],
        info={"protocol": "official annotations/trainval.txt (train) / test.txt"},
        index_files=files[:2],
    )


READER = register(
    Reader(
        name="oxford_pets",
        title="Oxford-IIIT Pet",
        marker="annotations/trainval.txt",
        layout=LAYOUT,
        read=read,
        source="https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz, annotations.tar.gz)",
    )
)
