"""--label-noise RATE (issue 21 §3): train/val labels flipped to another class, seeded, test clean."""

import hashlib
import json

import pytest
import torch

from conftest import make_image_folder, run_cli as run
from rifle.config import ConfigError, TrainConfig, resolve
from rifle.core.seeding import generator
from rifle.data import DataError, build_data, compare_fingerprints, data_fingerprint

FAST = ["--model", "tiny_cnn", "--image-size", "16", "--batch-size", "32", "--quiet"]


def digits(rate=0.0, seed=0, **kw):
    return build_data("digits", 16, seed=seed, label_noise=rate, **kw)


def differing(a, b) -> int:
    return int((a.train.labels != b.train.labels).sum() + (a.val.labels != b.val.labels).sum())


def sha(labels: torch.Tensor) -> str:
    return hashlib.sha256(labels.numpy().astype("<i8").tobytes()).hexdigest()


def test_rate_zero_changes_neither_labels_nor_fingerprint():
    plain, zero = build_data("digits", 16, seed=0), digits(0.0)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(plain, split).labels, getattr(zero, split).labels)
    # the fingerprint of a run without noise is the one recorded before the option existed
    assert data_fingerprint("digits", 0.0) == data_fingerprint("digits")
    assert set(data_fingerprint("digits")) == {"kind", "name", "version", "images"}
    n = len(zero.train) + len(zero.val)
    assert zero.info["label_noise"] == {
        "rate": 0.0,
        "flipped": 0,
        "of": n,
        "labels_sha256": sha(zero.train.labels),
    }


def test_rate_04_flips_train_and_val_to_other_classes_only_test_clean():
    clean, noisy = digits(0.0), digits(0.4)
    rec = noisy.info["label_noise"]
    n = len(clean.train) + len(clean.val)  # digits' train split, 10% of it carved as val
    assert rec["of"] == n
    # the recorded count is the number of labels that differ: a flip never keeps the same class
    assert rec["flipped"] == differing(clean, noisy)
    # ~40% (binomial sd sqrt(0.24 n) ~ 18 of 1348: +-0.06 is over 4 sd)
    assert abs(rec["flipped"] / n - 0.4) < 0.06
    assert (noisy.val.labels != clean.val.labels).any()  # the carved validation split is noisy too
    # the split itself (which images are train / val / test) is the run's without noise
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(clean, split).images, getattr(noisy, split).images)
    assert torch.equal(clean.test.labels, noisy.test.labels)  # test stays clean
    # new labels: another class, uniformly: (new - old) mod 10 spread over 1..9 (~47 each of ~420 flips)
    moved = noisy.train.labels != clean.train.labels
    assert noisy.train.labels.min() >= 0 and noisy.train.labels.max() <= 9
    shift = torch.bincount((noisy.train.labels - clean.train.labels)[moved] % 10, minlength=10)
    assert shift[0] == 0 and all(abs(int(s) - int(moved.sum()) / 9) < 25 for s in shift[1:]), shift
    assert rec["labels_sha256"] == sha(noisy.train.labels)
    assert noisy.info["class_counts"]["train"] == noisy.train.class_counts(10)


def test_draws_are_the_documented_stream_by_position_in_the_source_train_split():
    """Hand-check of docs/data.md: rand(n) < rate, then randint(1, C) offsets, from (seed, "label-noise"),
    indexed by each image's position in the source's train split (before carving val)."""
    from rifle.data import cache_resolution, load_digits_dataset, stratified_split

    splits, classes, _ = load_digits_dataset(cache_resolution(16))
    y = splits["train"].labels
    g = generator(5, "label-noise")
    flip = torch.rand(len(y), generator=g) < 0.25
    offset = torch.randint(1, 10, (len(y),), generator=g)
    expected = torch.where(flip, (y + offset) % 10, y)
    val_idx, train_idx = stratified_split(y, 0.1, generator(5, "split"), min_left=1)
    noisy = digits(0.25, seed=5)
    assert torch.equal(noisy.train.labels, expected[train_idx])
    assert torch.equal(noisy.val.labels, expected[val_idx])
    # another train_fraction / val_fraction: each image keeps its own draw
    for kw in (dict(train_fraction=0.5), dict(val_fraction=0.3)):
        other, clean = digits(0.25, seed=5, **kw), digits(0.0, seed=5, **kw)
        # an image by (clean label, bytes); a duplicate with another draw would make the lookup ambiguous
        keys = [(int(c), bytes(img.numpy())) for c, img in zip(y, splits["train"].images)]
        lookup = dict(zip(keys, expected.tolist()))
        assert len(lookup) == len(keys)
        for img, c, lab in zip(other.train.images, clean.train.labels, other.train.labels):
            assert lookup[(int(c), bytes(img.numpy()))] == int(lab)


def test_same_seed_same_flips_another_seed_other_flips():
    a, b, c = digits(0.4, seed=0), digits(0.4, seed=0), digits(0.4, seed=1)
    assert a.info["label_noise"] == b.info["label_noise"]
    assert torch.equal(a.train.labels, b.train.labels)
    assert a.info["label_noise"]["labels_sha256"] != c.info["label_noise"]["labels_sha256"]


def test_a_folder_val_split_is_noisy_too(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=(20, 3, 20), splits=("train", "test", "val"))
    clean = build_data(root, 16, seed=0)
    noisy = build_data(root, 16, seed=0, label_noise=0.5)
    assert clean.info["val"] == "folder"
    assert (noisy.val.labels != clean.val.labels).any() and (noisy.train.labels != clean.train.labels).any()
    assert torch.equal(noisy.test.labels, clean.test.labels)
    assert noisy.info["label_noise"]["flipped"] == differing(clean, noisy)
    assert noisy.info["label_noise"]["of"] == 60 + 60


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan"), "x", True])
def test_invalid_rate_is_a_clear_error(rate):
    with pytest.raises(DataError, match="label_noise"):
        digits(rate)
    with pytest.raises(ConfigError, match=r"--label-noise="):
        resolve({"label_noise": rate})


def test_yaml_numbers_are_coerced_and_cli_errors_name_the_flag(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("label_noise: 4e-1\n")  # YAML 1.1 reads this as a string
    assert resolve(config_file=cfg_file).label_noise == 0.4
    cfg_file.write_text("label_noise: 0\n")
    value = resolve(config_file=cfg_file).label_noise
    assert value == 0.0 and isinstance(value, float)
    code, _, err = run(
        ["train", "--data", "digits", "--label-noise", "1", "--out", str(tmp_path / "r")], capsys
    )
    assert code == 2 and "--label-noise=1.0" in err and "[0, 1)" in err, err
    assert TrainConfig().label_noise == 0.0


def test_fingerprint_records_the_rate_and_a_change_is_named():
    fp = data_fingerprint("digits", 0.3)
    assert fp["label_noise"] == 0.3
    assert compare_fingerprints(fp, data_fingerprint("digits", 0.3)) is None
    msg = compare_fingerprints(fp, data_fingerprint("digits", 0.2))
    assert msg and "label_noise" in msg and "0.3" in msg and "0.2" in msg
    assert "label_noise" in (compare_fingerprints(data_fingerprint("digits"), fp) or "")


def test_train_records_the_noise_two_methods_see_the_same_labels_and_resume_checks_it(tmp_path, capsys):
    from rifle.build import load_data

    common = ["--data", "digits", "--train-fraction", "0.3", "--label-noise", "0.3", "--epochs", "2", *FAST]
    runs = {}
    for method in (
        ["--method", "finetune"],
        ["--method", "rifle", "--reinits", "1", "--min-steps-after", "0"],
    ):
        out = tmp_path / method[1]
        code, _, err = run(["train", *common, *method, "--out", str(out)], capsys)
        assert code == 0, err
        runs[method[1]] = json.loads((out / "summary.json").read_text())
    rec = runs["finetune"]["label_noise"]
    data = load_data(TrainConfig(data="digits", train_fraction=0.3, label_noise=0.3, image_size=16))
    clean = load_data(TrainConfig(data="digits", train_fraction=0.3, image_size=16))
    assert rec == data.info["label_noise"] == runs["finetune"]["data_info"]["label_noise"]
    assert rec["rate"] == 0.3 and rec["of"] == len(data.train) + len(data.val)
    assert rec["flipped"] == differing(clean, data) > 0
    assert rec["labels_sha256"] == sha(data.train.labels)
    assert runs["rifle"]["label_noise"] == rec  # every method of one seed: the same noisy labels
    fp = json.loads((tmp_path / "finetune" / "data_fingerprint.json").read_text())
    assert fp["label_noise"] == 0.3

    # a resume with another rate is refused, naming the key; the same rate is accepted
    out = str(tmp_path / "finetune")
    code, _, err = run(["train", "--out", out, "--resume", "--label-noise", "0.2"], capsys)
    assert code == 2 and "label_noise: 0.3 -> 0.2" in err, err
    code, out_text, err = run(["train", "--out", out, "--resume", "--label-noise", "0.3"], capsys)
    assert code == 0, err


def test_a_bundle_built_for_another_rate_is_not_used(tmp_path):
    """The grid's data cache is keyed without label_noise: run_train rebuilds a bundle of another rate."""
    from rifle.build import load_data
    from rifle.run import run_train

    cfg = TrainConfig(
        data="digits", model="tiny_cnn", epochs=1, image_size=16, train_fraction=0.2, out=str(tmp_path / "r")
    )
    clean = load_data(cfg.validate())
    noisy_cfg = resolve(
        {
            **{k: getattr(cfg, k) for k in ("data", "model", "epochs", "image_size")},
            "train_fraction": 0.2,
            "label_noise": 0.3,
            "out": cfg.out,
        }
    )
    summary = run_train(noisy_cfg, data=clean, log=lambda s: None)
    assert summary["label_noise"] == load_data(noisy_cfg).info["label_noise"]
    assert summary["label_noise"]["flipped"] > 0


def test_a_grid_never_shares_decoded_data_between_noise_rates(tmp_path):
    """The grid's data cache keys on the noise rate: two rows that differ only in label_noise load twice."""
    from rifle.experiments.grid import expand, parse_grid
    from rifle.experiments.runner import DataCache

    grid = parse_grid(
        {
            "datasets": ["digits"],
            "models": ["tiny_cnn"],
            "seeds": [0],
            "train": {"epochs": 1, "image_size": 16},
            "methods": [{"name": "finetune"}, {"name": "finetune", "label_noise": 0.3}],
        }
    )
    specs = expand(grid, tmp_path)
    cache = DataCache()
    first, second = (cache.get(s) for s in specs)
    assert cache.loads == 2
    assert first.info["label_noise"]["rate"] == 0.0 and second.info["label_noise"]["rate"] == 0.3
