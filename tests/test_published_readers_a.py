"""Stanford Dogs, Stanford Cars (both published layouts), FGVC-Aircraft and DTD read from miniature copies
of their layouts (tiny flat-colour JPEGs: image i has red value 10*i, so a test sees where each landed;
``.mat`` files through scipy in the structure of the real ones), their options, and the errors of a
wrong or partial copy; the devkit Cars, Aircraft and DTD readers agree with torchvision's on the same
copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat
from test_published_data import jpeg, write

from rifle.data import DataError, build_data, data_fingerprint
from rifle.data.published import READERS, find_root, parse_spec


def cell(strings: list[str], column: bool = True) -> np.ndarray:
    """A MATLAB cell array of strings (N x 1, or 1 x N)."""
    a = np.empty((len(strings), 1) if column else (1, len(strings)), dtype=object)
    a.flat[:] = strings
    return a


def structs(rows: list[dict]) -> np.ndarray:
    """A MATLAB 1 x N struct array with the rows' fields (numbers as MATLAB scalars)."""
    a = np.zeros((1, len(rows)), dtype=[(k, "O") for k in rows[0]])
    for i, row in enumerate(rows):
        a[0, i] = tuple(v if isinstance(v, str) else np.array([[v]], dtype=np.uint16) for v in row.values())
    return a


def red(d) -> list[float]:
    return d.images[:, 0, 4, 4].tolist()


# ---------------------------------------------------------------- Stanford Dogs

DOGS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086079-Pekinese"]


def mini_dogs(base: Path) -> Path:
    """images.tar + lists.tar extracted in ``base/dogs``: 3 breeds x 3 images, the first 2 train. The test
    list is in reverse order (labels come from the list, not from the order)."""
    root = base / "dogs"
    train, test = [], []
    for c, breed in enumerate(DOGS):
        for j in range(3):
            i = 3 * c + j + 1
            rel = f"{breed}/{breed.split('-')[0]}_{i}.jpg"
            jpeg(root / "Images" / rel, 10 * i)
            (train if j < 2 else test).append((rel, c + 1))
    for name, rows in (("train_list.mat", train), ("test_list.mat", test[::-1])):
        rels = [r for r, _ in rows]
        savemat(
            root / name,
            {
                "file_list": cell(rels),
                "annotation_list": cell([r[:-4] for r in rels]),
                "labels": np.array([[y] for _, y in rows], dtype=np.float64),
            },
        )
    return root


def test_stanford_dogs_official_split_classes_and_labels(tmp_path):
    root = mini_dogs(tmp_path)
    d = build_data(f"stanford_dogs:{root}", 8, val_fraction=0.0)
    assert d.classes == DOGS
    assert d.info["source_info"]["official_sizes"] == {"train": 6, "test": 3}
    assert d.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert red(d.train) == pytest.approx([10, 20, 40, 50, 70, 80], abs=3)
    assert d.test.labels.tolist() == [2, 1, 0] and red(d.test) == pytest.approx([90, 60, 30], abs=3)
    assert "train_list.mat" in d.info["source_info"]["protocol"]
    # the parent of ROOT is accepted
    assert build_data(f"stanford_dogs:{tmp_path}", 8, val_fraction=0.0).info["sizes"]["test"] == 3


def test_stanford_dogs_partial_or_damaged_copies_are_named(tmp_path):
    root = mini_dogs(tmp_path)
    (root / "Images" / DOGS[1] / "n02085782_5.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of the 6 images listed in .*train_list.mat are missing"):
        build_data(f"stanford_dogs:{root}", 8)
    (root / "test_list.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=r"cannot read .*test_list.mat as a .mat file(.|\n)*Images/<wnid>"):
        build_data(f"stanford_dogs:{root}", 8)
    (root / "test_list.mat").unlink()
    with pytest.raises(DataError, match=r"missing .*test_list.mat(.|\n)*expected layout of Stanford Dogs"):
        build_data(f"stanford_dogs:{root}", 8)
    savemat(root / "test_list.mat", {"file_list": cell(["a/b.jpg"])})
    with pytest.raises(DataError, match=r"test_list.mat has no 'labels' variable"):
        build_data(f"stanford_dogs:{root}", 8)


# ---------------------------------------------------------------- Stanford Cars

CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]


def mini_cars_devkit(base: Path, test_in_devkit: bool = False) -> Path:
    """car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat in
    ``base/stanford_cars``: train images 1..6 (classes 1,1,2,2,3,3), test images 7..9 (classes 3,2,1)."""
    root = base / "stanford_cars"
    train = [
        {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 9, "bbox_y2": 9, "class": c, "fname": f"{i:05d}.jpg"}
        for i, c in zip(range(1, 7), [1, 1, 2, 2, 3, 3])
    ]
    test = [
        {"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 9, "bbox_y2": 9, "class": c, "fname": f"{i:05d}.jpg"}
        for i, c in zip(range(1, 4), [3, 2, 1])
    ]
    for row in train:
        jpeg(root / "cars_train" / row["fname"], 10 * int(row["fname"][:5]))
    for row in test:
        jpeg(root / "cars_test" / row["fname"], 10 * (6 + int(row["fname"][:5])))
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(CARS, column=False)})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": structs(train)})
    unlabelled = [{k: v for k, v in row.items() if k != "class"} for row in test]
    savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": structs(unlabelled)})
    where = root / "devkit" if test_in_devkit else root
    savemat(where / "cars_test_annos_withlabels.mat", {"annotations": structs(test)})
    return root


def mini_cars_all_in_one(base: Path) -> Path:
    """car_ims.tgz + cars_annos.mat in ``base/cars``: images 1..9, classes 1,1,2,2,3,3 (train) 3,2,1
    (test), the test images interleaved with the train ones."""
    root = base / "cars"
    classes = [1, 3, 1, 2, 2, 2, 3, 1, 3]
    tests = [0, 1, 0, 1, 0, 0, 0, 1, 1]
    rows = []
    for i, (c, t) in enumerate(zip(classes, tests), 1):
        rel = f"car_ims/{i:06d}.jpg"
        jpeg(root / rel, 10 * i)
        rows.append(
            {
                "relative_im_path": rel,
                "bbox_x1": 1,
                "bbox_y1": 1,
                "bbox_x2": 9,
                "bbox_y2": 9,
                "class": c,
                "test": t,
            }
        )
    savemat(root / "cars_annos.mat", {"annotations": structs(rows), "class_names": cell(CARS, column=False)})
    return root


@pytest.mark.parametrize("test_in_devkit", [False, True])
def test_stanford_cars_devkit_layout(tmp_path, test_in_devkit):
    root = mini_cars_devkit(tmp_path, test_in_devkit)
    d = build_data(f"stanford_cars:{tmp_path}", 8, val_fraction=0.0)  # the parent is accepted
    assert d.classes == CARS
    assert d.info["source_info"]["official_sizes"] == {"train": 6, "test": 3}
    assert d.info["source_info"]["layout"] == "devkit"
    assert d.info["source_info"]["root"] == str(root.resolve())
    assert d.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert red(d.train) == pytest.approx([10, 20, 30, 40, 50, 60], abs=3)
    assert d.test.labels.tolist() == [2, 1, 0] and red(d.test) == pytest.approx([70, 80, 90], abs=3)


def test_stanford_cars_all_in_one_layout(tmp_path):
    root = mini_cars_all_in_one(tmp_path)
    d = build_data(f"stanford_cars:{tmp_path}", 8, val_fraction=0.0)  # found through the parent too
    assert d.classes == CARS and d.info["source_info"]["layout"] == "all-in-one"
    assert d.info["source_info"]["official_sizes"] == {"train": 5, "test": 4}
    assert d.train.labels.tolist() == [0, 0, 1, 1, 2]
    assert red(d.train) == pytest.approx([10, 30, 50, 60, 70], abs=3)
    assert d.test.labels.tolist() == [2, 1, 0, 2] and red(d.test) == pytest.approx([20, 40, 80, 90], abs=3)
    (root / "car_ims" / "000004.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of the 9 images listed in .*cars_annos.mat are missing"):
        build_data(f"stanford_cars:{root}", 8)


def test_stanford_cars_incomplete_layouts_name_what_each_lacks(tmp_path):
    root = mini_cars_devkit(tmp_path)
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError) as e:
        build_data(f"stanford_cars:{root}", 8)
    msg = str(e.value)
    assert "neither published layout complete" in msg
    assert f"devkit layout lacks {root / 'cars_test_annos_withlabels.mat'};" in msg
    assert f"all-in-one layout lacks {root / 'cars_annos.mat'}, {root / 'car_ims'}" in msg
    assert "devkit/cars_test_annos.mat has no labels" in msg
    assert "expected layout of Stanford Cars" in msg and "car_ims/<nnnnnn>.jpg" in msg
    # the unlabelled test annotations in place of the labelled ones: the missing field is named
    (root / "devkit" / "cars_test_annos.mat").rename(root / "cars_test_annos_withlabels.mat")
    with pytest.raises(DataError, match=r"cars_test_annos_withlabels.mat have no 'class' field"):
        build_data(f"stanford_cars:{root}", 8)
    with pytest.raises(DataError, match=r"devkit/cars_meta.mat or .*cars_annos.mat not found"):
        build_data(f"stanford_cars:{root / 'devkit'}", 8)


# ---------------------------------------------------------------- FGVC-Aircraft

VARIANTS = ["707-320", "737-700", "A320"]
FAMILIES = ["Boeing 707", "Boeing 737", "A320"]
MAKERS = ["Boeing", "Airbus"]


def mini_aircraft(base: Path, name: str = "fgvc-aircraft-2013b") -> Path:
    """fgvc-aircraft-2013b/data/: 3 variants x 3 images (ids 00000i1), the first 2 of each trainval."""
    root = base / name
    data = root / "data"
    rows: dict[str, dict[str, list[str]]] = {
        lv: {"trainval": [], "test": []} for lv in ("variant", "family", "manufacturer")
    }
    for c, (variant, family) in enumerate(zip(VARIANTS, FAMILIES)):
        maker = "Airbus" if variant == "A320" else "Boeing"
        for j in range(3):
            i = 3 * c + j + 1
            image_id = f"{i:06d}1"
            jpeg(data / "images" / f"{image_id}.jpg", 10 * i)
            split = "trainval" if j < 2 else "test"
            for level, label in (("variant", variant), ("family", family), ("manufacturer", maker)):
                rows[level][split].append(f"{image_id} {label}")
    write(data / "variants.txt", VARIANTS)
    write(data / "families.txt", FAMILIES)
    write(data / "manufacturers.txt", MAKERS)
    for level, splits in rows.items():
        for split, lines in splits.items():
            write(data / f"images_{level}_{split}.txt", lines)
    # the official train / val halves of trainval exist too (not read)
    write(data / "images_variant_train.txt", rows["variant"]["trainval"][::2])
    return root


def test_fgvc_aircraft_variant_level_trainval_and_test(tmp_path):
    root = mini_aircraft(tmp_path)
    # ROOT's parent: the marker data/variants.txt is two levels down, ROOT is the folder above data/
    assert find_root(READERS["fgvc_aircraft"], tmp_path) == root
    d = build_data(f"fgvc_aircraft:{tmp_path}", 8, val_fraction=0.0)
    assert d.info["source_info"]["root"] == str(root.resolve())
    assert d.classes == VARIANTS
    assert d.info["source_info"]["official_sizes"] == {"train": 6, "test": 3}
    assert d.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert red(d.train) == pytest.approx([10, 20, 40, 50, 70, 80], abs=3)
    assert red(d.test) == pytest.approx([30, 60, 90], abs=3)
    assert "trainval" in d.info["source_info"]["protocol"]


def test_fgvc_aircraft_family_and_manufacturer_levels(tmp_path):
    root = mini_aircraft(tmp_path)
    d = build_data(f"fgvc_aircraft,level=family:{root}", 8, val_fraction=0.0)
    assert d.classes == FAMILIES and d.info["source_info"]["level"] == "family"
    d = build_data(f"fgvc_aircraft,level=manufacturer:{root}", 8, val_fraction=0.0)
    assert d.classes == MAKERS
    assert d.train.labels.tolist() == [0, 0, 0, 0, 1, 1] and d.test.labels.tolist() == [0, 0, 1]
    assert data_fingerprint(f"fgvc_aircraft,level=manufacturer:{root}")["options"] == {
        "level": "manufacturer"
    }
    with pytest.raises(DataError, match="level=model is not one of variant, family, manufacturer"):
        parse_spec(f"fgvc_aircraft,level=model:{root}")


def test_fgvc_aircraft_errors_name_the_file(tmp_path):
    root = mini_aircraft(tmp_path)
    (root / "data" / "images_family_test.txt").unlink()
    with pytest.raises(
        DataError, match=r"missing .*data/images_family_test.txt(.|\n)*expected layout of FGVC"
    ):
        build_data(f"fgvc_aircraft,level=family:{root}", 8)
    write(root / "data" / "images_variant_test.txt", ["0000031 707-320", "0000061 747-400"])
    with pytest.raises(
        DataError, match=r"images_variant_test.txt line 2: '747-400' is not a class of .*variants"
    ):
        build_data(f"fgvc_aircraft:{root}", 8)
    write(root / "data" / "images_variant_test.txt", ["0000031 707-320", "0000099 A320"])
    with pytest.raises(DataError, match=r"1 of the 2 images listed in .*images_variant_test.txt are missing"):
        build_data(f"fgvc_aircraft:{root}", 8)


# ---------------------------------------------------------------- DTD

TEXTURES = ["banded", "dotted", "zigzagged"]


def mini_dtd(base: Path) -> Path:
    """dtd/ with 3 classes x 3 images (image i: red 10*i) and partitions 1 and 2: in partition p, image
    j of a class goes to (train, val, test)[(j + p - 1) % 3]."""
    root = base / "dtd"
    lines: dict[str, list[str]] = {}
    for c, cls in enumerate(TEXTURES):
        for j in range(3):
            i = 3 * c + j + 1
            rel = f"{cls}/{cls}_{i:04d}.jpg"
            jpeg(root / "images" / rel, 10 * i)
            for p in (1, 2):
                lines.setdefault(f"{('train', 'val', 'test')[(j + p - 1) % 3]}{p}", []).append(rel)
    for name, rel in lines.items():
        write(root / "labels" / f"{name}.txt", rel)
    write(root / "labels" / "labels_joint_anno.txt", ["banded/banded_0001.jpg banded"])  # not read
    (root / "imdb").mkdir()
    return root


@pytest.mark.filterwarnings("ignore:the validation split")  # 3 val images (the miniature's)
def test_dtd_partitions_and_the_official_val_split(tmp_path):
    root = mini_dtd(tmp_path)
    d = build_data(f"dtd:{tmp_path}", 8, val_fraction=0.5)
    assert d.classes == TEXTURES
    assert d.info["val"] == "official" and d.info["val_fraction"] is None
    assert d.info["sizes"] == {"train": 3, "val": 3, "test": 3}
    assert d.info["source_info"]["official_sizes"] == {"train": 3, "val": 3, "test": 3}
    assert red(d.train) == pytest.approx([10, 40, 70], abs=3)
    assert red(d.val) == pytest.approx([20, 50, 80], abs=3) and d.val.labels.tolist() == [0, 1, 2]
    assert red(d.test) == pytest.approx([30, 60, 90], abs=3)
    d2 = build_data(f"dtd,partition=2:{root}", 8)
    assert red(d2.train) == pytest.approx([30, 60, 90], abs=3)  # partition 2 differs from 1
    assert red(d2.val) == pytest.approx([10, 40, 70], abs=3)
    assert d2.info["source_info"]["partition"] == 2 and "train2.txt" in d2.info["source_info"]["protocol"]
    assert data_fingerprint(f"dtd:{root}")["index_files"].keys() == {
        "labels/train1.txt",
        "labels/val1.txt",
        "labels/test1.txt",
    }


def test_dtd_bad_partitions_and_partial_copies(tmp_path):
    root = mini_dtd(tmp_path)
    with pytest.raises(DataError, match="partition=11 is not one of 1, 2, 3"):
        parse_spec(f"dtd,partition=11:{root}")
    with pytest.raises(DataError, match="partition='one' is not a valid partition"):
        parse_spec(f"dtd,partition=one:{root}")
    with pytest.raises(DataError, match=r"missing .*labels/train3.txt(.|\n)*expected layout of DTD"):
        build_data(f"dtd,partition=3:{root}", 8)
    write(root / "labels" / "test1.txt", ["banded/banded_0003.jpg", "striped/striped_0001.jpg"])
    with pytest.raises(DataError, match=r"test1.txt line 2: class 'striped' has no folder in .*images"):
        build_data(f"dtd:{root}", 8)
    write(root / "labels" / "test1.txt", ["banded/banded_0003.jpg", "banded_0009.jpg"])
    with pytest.raises(DataError, match=r"test1.txt line 2: expected '<class>/<image>.jpg'"):
        build_data(f"dtd:{root}", 8)
    write(root / "labels" / "test1.txt", ["banded/banded_0003.jpg", "dotted/dotted_0099.jpg"])
    with pytest.raises(DataError, match=r"1 of the 2 images listed in .*test1.txt are missing"):
        build_data(f"dtd:{root}", 8)


# ---------------------------------------------------------------- the same as torchvision's readers


def test_our_readers_agree_with_torchvision_on_the_same_copy(tmp_path):
    """Where torchvision reads the copy (its folder names: stanford_cars/, fgvc-aircraft-2013b/,
    dtd/dtd/), its images, labels and classes are ours."""
    from torchvision.datasets import DTD, FGVCAircraft, StanfordCars

    def ours(name: str, root: Path, **options) -> tuple[dict, list[str]]:
        reader = READERS[name]
        index = reader.read(root, {**reader.options, **options})
        return {
            s: ([str(p) for p in paths], labels) for s, (paths, labels) in index.splits.items()
        }, index.classes

    root = mini_cars_devkit(tmp_path / "c")
    splits, classes = ours("stanford_cars", root)
    for split in ("train", "test"):
        tv = StanfordCars(tmp_path / "c", split=split, download=False)
        assert tv.classes == classes
        assert splits[split] == ([p for p, _ in tv._samples], [y for _, y in tv._samples])

    root = mini_aircraft(tmp_path / "a")
    for level in ("variant", "family", "manufacturer"):
        splits, classes = ours("fgvc_aircraft", root, level=level)
        for split, tv_split in (("train", "trainval"), ("test", "test")):
            tv = FGVCAircraft(tmp_path / "a", split=tv_split, annotation_level=level, download=False)
            assert tv.classes == classes
            assert splits[split] == (tv._image_files, tv._labels)

    root = mini_dtd(tmp_path / "d" / "dtd")  # torchvision reads <root>/dtd/dtd/
    for partition in (1, 2):
        splits, classes = ours("dtd", root, partition=partition)
        for split in ("train", "val", "test"):
            tv = DTD(tmp_path / "d", split=split, partition=partition, download=False)
            assert tv.classes == classes
            assert splits[split] == ([str(p) for p in tv._image_files], tv._labels)
