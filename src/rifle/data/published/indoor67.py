"""MIT Indoor-67 (Quattoni & Torralba, "Recognizing Indoor Scenes", CVPR 2009): 67 indoor scene
categories, official split ``TrainImages.txt`` / ``TestImages.txt`` (80 / 20 per class: 5,360 / 1,340)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import Reader, SourceIndex, missing_images, read_lines, register, require
from ..folder import DataError

LAYOUT = """\
  ROOT/                   the folder holding Images/ and the two lists:
    Images/<class>/<image>.jpg    (what indoorCVPR_09.tar extracts)
    TrainImages.txt       <class>/<image>.jpg, one a line  \\ downloaded separately from the archive:
    TestImages.txt        <class>/<image>.jpg              / put them beside Images/"""


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    files = require(READER, root, "TrainImages.txt", "TestImages.txt", "Images")
    listed = {
        s: [x.replace("\\", "/") for x in read_lines(READER, f)] for s, f in zip(("train", "test"), files)
    }
    for split, f in zip(listed, files):
        bad = [line for line in listed[split] if len(Path(line).parts) != 2]
        if bad:
            raise DataError(f"{READER.title}: {f}: expected '<class>/<image>' lines, got {bad[0]!r}")
    classes = sorted({line.split("/")[0] for lines in listed.values() for line in lines})
    label_of = {c: i for i, c in enumerate(classes)}
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    for split, f in zip(listed, files):
        paths = [root / "Images" / line for line in listed[split]]
        try:
            missing_images(READER, paths, f)
        except DataError as e:
            raise DataError(
                f"{e}\n(--skip-bad-images skips listed files that exist but cannot be decoded, not missing "
                "ones: restore them from indoorCVPR_09.tar.)"
            ) from None
        splits[split] = (paths, [label_of[line.split("/")[0]] for line in listed[split]])
    return SourceIndex(
        splits=splits,
        classes=classes,
        info={"protocol": "official TrainImages.txt / TestImages.txt"},
        index_files=files[:2],
    )


READER = register(
    Reader(
        name="indoor67",
        title="MIT Indoor-67",
        marker="TrainImages.txt",
        layout=LAYOUT,
        read=read,
        source="https://web.mit.edu/torralba/www/indoor.html "
        "(indoorCVPR_09.tar, TrainImages.txt, TestImages.txt)",
    )
)
