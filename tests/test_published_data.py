"""Published datasets read from miniature copies of their layouts (the test writes them: a few tiny JPEGs
and the dataset's own index files, ``.mat`` through scipy); wrong or partial layouts get errors that name
the missing file and show the expected layout. ``--train-per-class`` and the ``NAME:ROOT`` spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rifle.data import DataError, build_data, data_fingerprint, compare_fingerprints
from rifle.data.published import READERS, parse_spec


def jpeg(path: Path, value: int, size: tuple[int, int] = (12, 10), gray: bool = False) -> Path:
    """A tiny JPEG of one flat colour (``value`` decides it), so a test can tell images apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    if gray:
        a = np.full((size[1], size[0]), value % 256, np.uint8)
    else:
        a = np.full((size[1], size[0], 3), value % 256, np.uint8)
        a[..., 1] = rng.integers(0, 256)
    Image.fromarray(a).save(path, quality=95)
    return path


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# ---------------------------------------------------------------- CUB-200-2011


def mini_cub(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """CUB_200_2011/ with ``classes`` x ``per_class`` images; the first half of each class is train."""
    root = root / "CUB_200_2011"
    names = [f"{c + 1:03d}.Bird_{c}" for c in range(classes)]
    images, labels, split = [], [], []
    i = 0
    for c, name in enumerate(names):
        for j in range(per_class):
            i += 1
            rel = f"{name}/{name}_{j}.jpg"
            jpeg(root / "images" / rel, 10 * i, gray=(i == 2))
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c + 1}")
            split.append(f"{i} {int(j < per_class // 2)}")
    write(root / "images.txt", images)
    write(root / "image_class_labels.txt", labels)
    write(root / "train_test_split.txt", split)
    write(root / "classes.txt", [f"{c + 1} {n}" for c, n in enumerate(names)])
    return root


def test_cub200_reads_the_official_split_and_class_names(tmp_path):
    root = mini_cub(tmp_path)
    d = build_data(f"cub200:{root}", 8, val_fraction=0.0)
    assert d.classes == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    assert d.info["sizes"] == {"train": 6, "val": 0, "test": 6}
    assert d.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.train.channels == 3  # the grayscale JPEG (image 2) is repeated to RGB
    # image i is a flat colour 10*i: train holds images 1,2 5,6 9,10 (j < 2 of each class)
    assert d.train.images[:, 0, 4, 4].tolist() == pytest.approx([10, 20, 50, 60, 90, 100], abs=3)
    assert d.info["source_info"]["official_sizes"] == {"train": 6, "test": 6}


def test_the_parent_of_root_is_accepted_and_a_partial_copy_is_named(tmp_path):
    root = mini_cub(tmp_path)
    assert build_data(f"cub200:{tmp_path}", 8, val_fraction=0.0).info["sizes"]["test"] == 6
    (root / "train_test_split.txt").unlink()
    with pytest.raises(
        DataError, match=r"missing .*train_test_split.txt(.|\n)*expected layout of CUB-200-2011"
    ):
        build_data(f"cub200:{root}", 8)
    write(root / "train_test_split.txt", [f"{i} 1" for i in range(1, 13)])
    next((root / "images").rglob("*.jpg")).unlink()
    with pytest.raises(DataError, match=r"1 of the 12 images listed in .*images.txt are missing"):
        build_data(f"cub200:{root}", 8)


def test_a_folder_that_is_not_the_dataset_shows_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"image_class_labels.txt not found(.|\n)*images.txt"):
        build_data(f"cub200:{tmp_path}", 8)
    with pytest.raises(DataError, match="does not exist"):
        build_data(f"cub200:{tmp_path / 'nope'}", 8)


def test_spec_parsing_options_and_typos(tmp_path):
    spec = parse_spec(f"CUB200:{tmp_path}")
    assert spec is not None and spec.name == "cub200" and spec.root == str(tmp_path)
    assert parse_spec("digits") is None and parse_spec(str(tmp_path)) is None
    with pytest.raises(DataError, match="did you mean 'cub200'"):
        parse_spec(f"cub20:{tmp_path}")
    with pytest.raises(DataError, match="unknown option 'size=3' of cub200"):
        parse_spec(f"cub200,size=3:{tmp_path}")
    with pytest.raises(DataError, match="no ROOT"):
        parse_spec("cub200:")


def test_train_per_class_is_fixed_across_run_seeds_and_val_comes_from_the_rest(tmp_path):
    root = mini_cub(tmp_path, classes=3, per_class=8)  # 4 train images per class
    a = build_data(f"cub200:{root}", 8, seed=0, val_fraction=0.5, train_per_class=2)
    b = build_data(f"cub200:{root}", 8, seed=1, val_fraction=0.5, train_per_class=2)
    assert torch.equal(a.train.images, b.train.images)  # the same 2 per class for every run seed
    assert a.train.class_counts() == [2, 2, 2]
    assert a.val.class_counts() == [1, 1, 1]  # half of the 2 left over per class
    assert torch.equal(a.test.images, b.test.images) and len(a.test) == 12
    assert a.info["train_per_class"] == {
        "n": 2,
        "split_seed": 0,
        "kept": 6,
        "left_over": 6,
        "short_classes": [],
    }
    # no val image is a train image
    trains = {tuple(x.flatten().tolist()) for x in a.train.images}
    assert not any(tuple(x.flatten().tolist()) in trains for x in a.val.images)


def test_fingerprint_notices_a_changed_index_file(tmp_path):
    root = mini_cub(tmp_path)
    fp = data_fingerprint(f"cub200:{root}")
    assert fp["kind"] == "published" and fp["images"] == 12
    assert compare_fingerprints(fp, data_fingerprint(f"cub200:{root}")) is None
    write(root / "train_test_split.txt", [f"{i} 1" for i in range(1, 13)])
    assert "train_test_split.txt" in compare_fingerprints(fp, data_fingerprint(f"cub200:{root}"))


def test_every_reader_is_registered():
    names = {
        "cub200",
        "stanford_dogs",
        "stanford_cars",
        "fgvc_aircraft",
        "dtd",
        "food101",
        "indoor67",
        "caltech256",
        "flowers102",
        "oxford_pets",
    }
    parse_spec("cub200:/x")  # loads the readers
    assert names <= set(READERS)


def test_paper_preset_trains_resnet50_on_a_miniature_cub_from_the_cli(tmp_path, capsys):
    """Issue 22 §4: the paper's recipe (torchvision ResNet-50, SGD, cosine) on the CUB layout, on the CPU,
    without downloaded weights (--no-pretrained); 112 px instead of 224 to keep CI fast."""
    import json

    from conftest import run_cli

    root = mini_cub(tmp_path, classes=3, per_class=4)
    out = tmp_path / "run"
    argv = ["train", "--data", f"cub200:{tmp_path}", "--preset", "paper", "--no-pretrained"]
    argv += ["--method", "rifle", "--reinits", "1", "--epochs", "2", "--image-size", "112", "--out", out]
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 0, stderr
    assert (
        "torchvision:resnet50 on cub200:" in stdout and "6 train / 0 val / 6 test images, 3 classes" in stdout
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_info"]["source_info"]["dataset"] == "CUB-200-2011"
    assert summary["data_info"]["source_info"]["root"] == str(root.resolve())
    assert summary["reinit_epochs"] == [1]
    assert json.loads((out / "data_fingerprint.json").read_text())["kind"] == "published"


def test_evaluate_reads_a_published_test_split_by_the_runs_rules(tmp_path, capsys):
    from conftest import run_cli

    mini_cub(tmp_path, classes=2, per_class=4)
    out = tmp_path / "run"
    code, _, err = run_cli(
        [
            "train",
            "--data",
            f"cub200:{tmp_path}",
            "--model",
            "tiny_cnn",
            "--no-pretrained",
            "--epochs",
            "1",
            "--image-size",
            "16",
            "--val-fraction",
            "0",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    code, stdout, err = run_cli(["evaluate", out, "--data", f"cub200:{tmp_path}"], capsys)
    assert code == 0, err
    assert (out / "eval-cub200-test" / "metrics.json").is_file()  # a folder-safe name, not the ROOT


def test_a_second_build_reads_the_published_dataset_from_the_decode_cache(tmp_path, calls):
    """One cache entry per official split, shared by every run seed; --train-per-class decodes only the
    images it keeps (and the validation images carved from the rest)."""
    from test_decode_cache import age, entries

    n = calls
    cache = tmp_path / "cache"
    root = mini_cub(tmp_path / "data", classes=3, per_class=8)  # 12 train / 12 test
    age(root)
    a = build_data(f"cub200:{root}", 8, seed=0, val_fraction=0.25, cache_dir=cache)
    assert n[0] == 24 and len(entries(cache)) == 2  # train and test, each decoded once
    b = build_data(f"cub200:{root}", 8, seed=1, val_fraction=0.25, cache_dir=cache)
    assert n[0] == 24 and len(entries(cache)) == 2  # another seed: nothing decoded
    assert torch.equal(a.test.images, b.test.images)  # the official test split, the same entry
    assert sorted(a.train.images.flatten().tolist() + a.val.images.flatten().tolist()) == sorted(
        b.train.images.flatten().tolist() + b.val.images.flatten().tolist()
    )
    n[0] = 0
    c = build_data(f"cub200:{root}", 8, seed=0, val_fraction=0.5, train_per_class=2, cache_dir=cache / "pc")
    assert len(c.train) == 6 and len(c.val) == 3 and n[0] == 6 + 3 + 12  # kept + val + the whole test
