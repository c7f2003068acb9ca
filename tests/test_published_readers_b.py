"""Food-101, MIT Indoor-67, Caltech-256, Oxford 102 Flowers and Oxford-IIIT Pet read from miniature copies
of their published layouts (tiny flat-colour JPEGs, the datasets' own index files, ``.mat`` through
scipy): official split sizes, labels and class names, which image lands in which split, the fixed
per-class draws (Food-101-30, Caltech-256-N), and the errors for wrong or partial copies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from rifle.data import DataError, build_data, data_fingerprint
from test_published_data import jpeg, write


def red(ds) -> list[int]:
    """The flat colour of each image (channel 0), which the miniature copies set per image."""
    return [round(v) for v in ds.images[:, 0, 4, 4].tolist()]


def close(got: list[int], want: list[int], tol: int = 3) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= tol for a, b in zip(got, want))


# ---------------------------------------------------------------- Food-101

FOOD = ["apple_pie", "baby_back_ribs", "beignets"]


def mini_food(tmp: Path, train: int = 4, test: int = 2) -> Path:
    """food-101/ with 3 classes; image value 10*i, the first ``train`` of each class in train."""
    root = tmp / "food-101"
    lists: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    i = 0
    for c in FOOD:
        for j in range(train + test):
            i += 1
            ident = f"{c}/{1000 + i}"
            jpeg(root / "images" / f"{ident}.jpg", 10 * i)
            lists["train" if j < train else "test"].setdefault(c, []).append(ident)
    for split, by_class in lists.items():
        (root / "meta" / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "meta" / f"{split}.json").write_text(json.dumps(by_class))
        write(root / "meta" / f"{split}.txt", [x for c in FOOD for x in by_class[c]])
    write(root / "meta" / "classes.txt", FOOD)
    return root


def test_food101_official_split_and_food101_n(tmp_path):
    root = mini_food(tmp_path)
    d = build_data(f"food101:{tmp_path}", 8, val_fraction=0.0)  # the parent of food-101/ is accepted
    assert d.classes == FOOD
    assert d.info["sizes"] == {"train": 12, "val": 0, "test": 6}
    assert d.info["source_info"]["official_sizes"] == {"train": 12, "test": 6}
    assert d.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert close(red(d.train), [10, 20, 30, 40, 70, 80, 90, 100, 130, 140, 150, 160])
    assert close(red(d.test), [50, 60, 110, 120, 170, 180]) and d.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # Food-101-N: N per class, the same for every run seed; the test split stays the full official one
    a = build_data(f"food101:{root}", 8, seed=0, val_fraction=0.5, train_per_class=2)
    b = build_data(f"food101:{root}", 8, seed=1, val_fraction=0.5, train_per_class=2)
    assert a.train.class_counts() == [2, 2, 2] and torch.equal(a.train.images, b.train.images)
    assert a.val.class_counts() == [1, 1, 1]  # half of the 2 left over per class
    assert torch.equal(a.test.images, d.test.images) and len(b.test) == 6
    assert a.info["train_per_class"]["left_over"] == 6
    assert all(10 * 1 <= v <= 160 + 3 for v in red(a.train))  # training images only
    assert not set(red(a.train)) & set(red(a.val))


def test_food101_errors_name_the_file_and_show_the_layout(tmp_path):
    root = mini_food(tmp_path)
    (root / "meta" / "test.json").unlink()
    with pytest.raises(DataError, match=r"missing .*meta/test.json(.|\n)*expected layout of Food-101"):
        build_data(f"food101:{root}", 8)
    (root / "meta" / "test.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read .*meta/test.json \(JSONDecodeError"):
        build_data(f"food101:{root}", 8)
    (root / "meta" / "test.json").write_text(json.dumps({c: [] for c in FOOD} | {"beignets": ["beignets/9"]}))
    with pytest.raises(DataError, match=r"1 of the 1 images listed in .*test.json are missing, e.g. .*9.jpg"):
        build_data(f"food101:{root}", 8)
    (root / "meta").rename(tmp_path / "meta")
    with pytest.raises(DataError, match=r"meta/train.json not found(.|\n)*images/<class>/<id>.jpg"):
        build_data(f"food101:{root}", 8)
    renamed = mini_food(tmp_path / "x").rename(tmp_path / "x" / "food101")
    with pytest.raises(DataError, match="needs the folder to be named food-101"):
        build_data(f"food101:{renamed}", 8)


# ---------------------------------------------------------------- MIT Indoor-67

INDOOR = ["bakery", "kitchen", "winecellar"]


def mini_indoor(tmp: Path) -> Path:
    """3 classes x 3 listed images (2 train, 1 test; value 10*i) and one unlisted image per class."""
    root = tmp / "indoor"
    train, test = [], []
    i = 0
    for c in INDOOR:
        for j in range(3):
            i += 1
            rel = f"{c}/img_{i}.jpg"
            jpeg(root / "Images" / rel, 10 * i)
            (train if j < 2 else test).append(rel)
        jpeg(root / "Images" / c / "unlisted.jpg", 250)
    write(root / "TrainImages.txt", train)
    write(root / "TestImages.txt", test)
    return root


def test_indoor67_official_lists(tmp_path):
    root = mini_indoor(tmp_path)
    d = build_data(f"indoor67:{tmp_path}", 8, val_fraction=0.0)
    assert d.classes == INDOOR
    assert d.info["source_info"]["official_sizes"] == {"train": 6, "test": 3}
    assert d.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and d.test.labels.tolist() == [0, 1, 2]
    assert close(red(d.train), [10, 20, 40, 50, 70, 80]) and close(red(d.test), [30, 60, 90])
    # a GIF named .jpg (Indoor-67 has some) decodes by its content
    gif = root / "Images" / "kitchen" / "img_6.jpg"
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(gif, format="GIF")
    assert close(red(build_data(f"indoor67:{root}", 8, val_fraction=0.0).test), [30, 200, 90], tol=6)
    # one that cannot be decoded is named, and --skip-bad-images skips it
    gif.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"img_6.jpg(.|\n)*--skip-bad-images"):
        build_data(f"indoor67:{root}", 8)
    d = build_data(f"indoor67:{root}", 8, val_fraction=0.0, skip_bad_images=True)
    assert d.test.labels.tolist() == [0, 2] and d.info["skipped"] == [str(gif)]


def test_indoor67_errors(tmp_path):
    root = mini_indoor(tmp_path)
    (root / "TestImages.txt").unlink()
    with pytest.raises(DataError, match=r"missing .*TestImages.txt(.|\n)*downloaded separately"):
        build_data(f"indoor67:{root}", 8)
    (root / "TrainImages.txt").unlink()
    with pytest.raises(DataError, match=r"TrainImages.txt not found(.|\n)*holding Images/ and the two lists"):
        build_data(f"indoor67:{root}", 8)
    write(root / "TrainImages.txt", ["bakery/img_1.jpg", "kitchen/gone.jpg"])
    write(root / "TestImages.txt", ["bakery/img_3.jpg"])
    with pytest.raises(
        DataError,
        match=r"1 of the 2 images listed in .*TrainImages.txt are missing, "
        r"e.g. .*kitchen/gone.jpg(.|\n)*--skip-bad-images skips (.|\n)*not missing",
    ):
        build_data(f"indoor67:{root}", 8)
    write(root / "TestImages.txt", ["img_3.jpg"])
    with pytest.raises(DataError, match=r"TestImages.txt: expected '<class>/<image>' lines, got 'img_3.jpg'"):
        build_data(f"indoor67:{root}", 8)


# ---------------------------------------------------------------- Caltech-256

CALTECH = {"001.ak47": 25, "002.american-flag": 25, "003.backpack": 10}


def mini_caltech(tmp: Path) -> Path:
    """256_ObjectCategories/ with 3 classes (25, 25, 10 images), 257.clutter, and stray files."""
    root = tmp / "256_ObjectCategories"
    i = 0
    for name, n in {**CALTECH, "257.clutter": 3}.items():
        for j in range(1, n + 1):
            i += 1
            jpeg(root / name / f"{name[:3]}_{j:04d}.jpg", 4 * i)
    write(root / "002.american-flag" / "RENAME2", ["x"])  # as 198.spider has
    write(root / "001.ak47" / ".DS_Store", ["x"])
    (root / "003.backpack" / "greg").mkdir()
    return root


def test_caltech256_needs_train_per_class_and_draws_20_test_per_class(tmp_path):
    root = mini_caltech(tmp_path)
    with pytest.raises(
        DataError, match=r"no official train/test split: pass --train-per-class N(.|\n)*20 further"
    ):
        build_data(f"caltech256:{root}", 8)
    with pytest.warns(UserWarning, match=r"1 of the 3 classes have fewer training images \(003.backpack\)"):
        a = build_data(f"caltech256:{tmp_path}", 8, seed=0, val_fraction=0.5, train_per_class=3)
    assert a.classes == list(CALTECH)  # 257.clutter excluded
    assert a.train.class_counts() == [3, 3, 3]
    assert a.test.class_counts() == [20, 20, 7]  # 20 further per class; 003 has only 10 - 3
    assert a.val.class_counts(3) == [1, 1, 0]  # half of the 2 + 2 + 0 left over
    assert a.info["train_per_class"] == {
        "n": 3,
        "split_seed": 0,
        "kept": 9,
        "left_over": 4,
        "short_classes": ["003.backpack"],
    }
    info = a.info["source_info"]
    assert info["official_sizes"] == {"train": 60}
    assert sorted(info["ignored_files"]) == ["002.american-flag/RENAME2", "003.backpack/greg"]
    # every image at most once (train 9, val 2, test 47; 2 left over), and no clutter image
    seen = red(a.train) + red(a.val) + red(a.test)
    assert len(set(seen)) == len(seen) == 58 and max(seen) <= 4 * 60 + 3
    with pytest.warns(UserWarning):
        b = build_data(f"caltech256:{root}", 8, seed=1, val_fraction=0.5, train_per_class=3)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert torch.equal(a.train.images, b.train.images)  # the fixed split seed, whatever the run seed
    assert data_fingerprint(f"caltech256:{root}")["images"] == 60


def test_caltech256_errors(tmp_path):
    root = mini_caltech(tmp_path)
    with pytest.raises(DataError, match=r"001.ak47 not found(.|\n)*257.clutter/ +\(not a category"):
        build_data(f"caltech256:{root / '002.american-flag'}", 8, train_per_class=3)
    for f in (root / "003.backpack").glob("*.jpg"):
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*003.backpack holds no images"):
        build_data(f"caltech256:{root}", 8, train_per_class=3)


# ---------------------------------------------------------------- Oxford 102 Flowers


def mini_flowers(tmp: Path) -> Path:
    """12 images (value 10*i) of 3 classes; per class 1 train, 1 val, 2 test."""
    root = tmp / "flowers"
    labels = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    for i in range(1, 13):
        jpeg(root / "jpg" / f"image_{i:05d}.jpg", 10 * i)
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.float64)})  # 1 x N, as shipped
    ids = {"trnid": [3, 1, 2], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10, 11, 12]}
    savemat(root / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return root


def test_flowers102_official_train_val_test(tmp_path):
    mini_flowers(tmp_path)
    d = build_data(f"flowers102:{tmp_path}", 8, val_fraction=0.3)
    assert d.classes == ["001", "002", "003"]  # not 102 classes: the label numbers
    assert d.info["val"] == "official" and d.info["val_fraction"] is None
    assert d.info["source_info"]["official_sizes"] == {"train": 3, "val": 3, "test": 6}
    assert close(red(d.train), [30, 10, 20]) and d.train.labels.tolist() == [2, 0, 1]
    assert close(red(d.val), [40, 50, 60]) and d.val.labels.tolist() == [0, 1, 2]
    assert close(red(d.test), [70, 80, 90, 100, 110, 120]) and d.test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    from rifle.data.published.flowers102 import class_names

    names = class_names(102)
    assert len(names) == 102 and names[0] == "pink primrose" and names[-1] == "blackberry lily"


def test_flowers102_errors(tmp_path):
    root = mini_flowers(tmp_path)
    (root / "imagelabels.mat").rename(root / "labels.mat")
    with pytest.raises(DataError, match=r"missing .*imagelabels.mat(.|\n)*downloaded separately"):
        build_data(f"flowers102:{root}", 8)
    (root / "labels.mat").rename(root / "imagelabels.mat")
    savemat(root / "setid.mat", {"trnid": np.array([[1]]), "tstid": np.array([[2]])})
    with pytest.raises(DataError, match=r"setid.mat has no 'valid' \(it has: trnid, tstid\)"):
        build_data(f"flowers102:{root}", 8)
    savemat(
        root / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[13]])}
    )
    with pytest.raises(DataError, match=r"'tstid' names image 13 but .*imagelabels.mat labels images 1..12"):
        build_data(f"flowers102:{root}", 8)
    savemat(
        root / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[3]])}
    )
    (root / "jpg" / "image_00003.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of the 1 images listed in .*setid.mat \('tstid'\) are missing"):
        build_data(f"flowers102:{root}", 8)
    (root / "setid.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read .*setid.mat as a .mat file"):
        build_data(f"flowers102:{root}", 8)


# ---------------------------------------------------------------- Oxford-IIIT Pet

PETS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier"]


def mini_pets(tmp: Path) -> Path:
    """3 breeds x 4 images (value 10*i); the first 2 of each trainval, the rest test."""
    root = tmp / "pets"
    trainval, test = [], ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids"]
    i = 0
    for cid, breed in enumerate(PETS, 1):
        species = 1 if breed[0].isupper() else 2
        for n in range(1, 5):
            i += 1
            jpeg(root / "images" / f"{breed}_{n}.jpg", 10 * i)
            (trainval if n <= 2 else test).append(f"{breed}_{n} {cid} {species} {cid}")
    jpeg(root / "images" / "Abyssinian_99.jpg", 250)  # in no list
    write(root / "annotations" / "trainval.txt", trainval)
    write(root / "annotations" / "test.txt", test)
    return root


def test_oxford_pets_official_split_and_breed_names(tmp_path):
    mini_pets(tmp_path)
    d = build_data(f"oxford_pets:{tmp_path}", 8, val_fraction=0.0)
    assert d.classes == PETS
    assert d.info["source_info"]["official_sizes"] == {"train": 6, "test": 6}
    assert close(red(d.train), [10, 20, 50, 60, 90, 100]) and d.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert close(red(d.test), [30, 40, 70, 80, 110, 120]) and d.test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_oxford_pets_errors(tmp_path):
    root = mini_pets(tmp_path)
    (root / "annotations" / "test.txt").unlink()
    with pytest.raises(
        DataError, match=r"missing .*annotations/test.txt(.|\n)*expected layout of Oxford-IIIT Pet"
    ):
        build_data(f"oxford_pets:{root}", 8)
    write(root / "annotations" / "test.txt", ["Abyssinian_3 1 1 1", "beagle_7 3 2 3"])
    with pytest.raises(DataError, match=r"class 3 is 'american_pit_bull_terrier' and 'beagle'"):
        build_data(f"oxford_pets:{root}", 8)
    write(root / "annotations" / "test.txt", ["Abyssinian_3 1 1 1", "Abyssinian_7 1 1 1"])
    with pytest.raises(
        DataError, match=r"1 of the 2 images listed in .*test.txt are missing, e.g. .*Abyssinian_7.jpg"
    ):
        build_data(f"oxford_pets:{root}", 8)
    write(root / "annotations" / "test.txt", ["Abyssinian_3 one 1 1"])
    with pytest.raises(DataError, match=r"test.txt line 1: expected '<image> <class id>"):
        build_data(f"oxford_pets:{root}", 8)
