"""Stanford Cars (Krause et al., "3D object representations for fine-grained categorization", 3dRR
workshop at ICCV 2013): 196 car models, official split 8,144 train / 8,041 test. Both published layouts
are read: the devkit one (what torchvision's ``StanfordCars`` reads) and the all-in-one ``cars_annos.mat``
with ``car_ims/``. Ours, not torchvision's: it reads only the devkit layout, and only under a folder
named ``stanford_cars`` with the test labels beside ``devkit/`` (docs/data.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import Reader, SourceIndex, missing_images, read_mat, register
from ..folder import DataError

LAYOUT = """\
  either the devkit layout (car_devkit.tgz, cars_train.tgz, cars_test.tgz, cars_test_annos_withlabels.mat):
  ROOT/
    devkit/cars_meta.mat             class_names (196)
    devkit/cars_train_annos.mat      annotations: fname, class (1..196), bbox_*
    cars_test_annos_withlabels.mat   annotations of the test images, with class (also read from devkit/)
    cars_train/<fname>.jpg           8,144 images
    cars_test/<fname>.jpg            8,041 images
  or the all-in-one layout (car_ims.tgz, cars_annos.mat):
  ROOT/
    cars_annos.mat                   annotations: relative_im_path (car_ims/000001.jpg), class, test (0/1);
                                     class_names
    car_ims/<nnnnnn>.jpg             16,185 images"""

TEST_ANNOS = "cars_test_annos_withlabels.mat"


def _names(path: Path, mat: dict[str, Any]) -> list[str]:
    if "class_names" not in mat:
        raise DataError(f"{READER.title}: {path} has no 'class_names' variable.\n{READER.expected()}")
    return [str(c).strip() for c in np.atleast_1d(mat["class_names"]).ravel()]


def _annotations(path: Path, mat: dict[str, Any], *fields: str) -> dict[str, list]:
    """The fields of the ``annotations`` struct array of a .mat file loaded with squeeze_me."""
    ann = mat.get("annotations")
    if ann is None or ann.dtype.names is None:
        raise DataError(f"{READER.title}: {path} has no 'annotations' struct array.\n{READER.expected()}")
    ann = np.atleast_1d(ann).ravel()
    for f in fields:
        if f not in (ann.dtype.names or ()):
            hint = (
                " (cars_test_annos.mat has no labels: the test labels are in cars_test_annos_withlabels.mat)"
            )
            raise DataError(
                f"{READER.title}: the annotations in {path} have no '{f}' field"
                + (hint if f == "class" else "")
                + f".\n{READER.expected()}"
            )
    return {f: [a[f] for a in ann] for f in fields}


def _devkit(root: Path) -> tuple[list[Path], list[Path]]:
    """The devkit layout's files (meta, train annotations, test annotations, image folders) and the ones
    missing."""
    test = root / TEST_ANNOS
    if not test.exists() and (root / "devkit" / TEST_ANNOS).exists():
        test = root / "devkit" / TEST_ANNOS
    files = [
        root / "devkit" / "cars_meta.mat",
        root / "devkit" / "cars_train_annos.mat",
        test,
        root / "cars_train",
        root / "cars_test",
    ]
    return files, [p for p in files if not p.exists()]


def _read_devkit(root: Path, files: list[Path]) -> SourceIndex:
    meta, train_annos, test_annos, train_dir, test_dir = files
    classes = _names(meta, read_mat(READER, meta))
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    for split, annos, folder in (("train", train_annos, train_dir), ("test", test_annos, test_dir)):
        a = _annotations(annos, read_mat(READER, annos), "fname", "class")
        splits[split] = ([folder / str(f).strip() for f in a["fname"]], [int(y) - 1 for y in a["class"]])
        missing_images(READER, splits[split][0], annos)
    return SourceIndex(
        splits=splits,
        classes=classes,
        info={
            "protocol": f"official split of the devkit: cars_train_annos.mat / {test_annos.name}",
            "layout": "devkit",
        },
        index_files=[meta, train_annos, test_annos],
    )


def _read_all_in_one(root: Path, path: Path) -> SourceIndex:
    mat = read_mat(READER, path)
    classes = _names(path, mat)
    a = _annotations(path, mat, "relative_im_path", "class", "test")
    splits: dict[str, tuple[list[Path], list[int]]] = {"train": ([], []), "test": ([], [])}
    for rel, y, test in zip(a["relative_im_path"], a["class"], a["test"]):
        s = "test" if int(test) else "train"
        splits[s][0].append(root / str(rel).strip())
        splits[s][1].append(int(y) - 1)
    missing_images(READER, splits["train"][0] + splits["test"][0], path)
    return SourceIndex(
        splits=splits,
        classes=classes,
        info={"protocol": "official split: the 'test' flag of cars_annos.mat", "layout": "all-in-one"},
        index_files=[path],
    )


def read(root: Path, options: dict[str, Any]) -> SourceIndex:
    files, missing = _devkit(root)
    if not missing:
        return _read_devkit(root, files)
    all_in_one = [root / "cars_annos.mat", root / "car_ims"]
    missing_b = [p for p in all_in_one if not p.exists()]
    if not missing_b:
        return _read_all_in_one(root, all_in_one[0])
    hint = ""
    if files[2] in missing and (root / "devkit" / "cars_test_annos.mat").exists():
        hint = f" (devkit/cars_test_annos.mat has no labels: {TEST_ANNOS}, published separately, has them)"
    raise DataError(
        f"{READER.title}: {root} holds neither published layout complete: the devkit layout lacks "
        f"{', '.join(map(str, missing))}; the all-in-one layout lacks {', '.join(map(str, missing_b))}"
        f"{hint}.\n{READER.expected()}"
    )


READER = register(
    Reader(
        name="stanford_cars",
        title="Stanford Cars",
        marker="devkit/cars_meta.mat|cars_annos.mat",
        layout=LAYOUT,
        read=read,
        source="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline; mirrors: docs/reproduce.md)",
    )
)
