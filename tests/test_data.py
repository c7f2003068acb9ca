"""Tests of rifle.data: splits, batches, image folders, built-in datasets (all offline, a few seconds)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from rifle.core.seeding import generator
from rifle.data import (
    BUILTIN,
    DataBundle,
    DataError,
    ImageTensorSet,
    build_data,
    cache_resolution,
    eval_batches,
    num_batches,
    samples_per_rank,
    stratified_split,
    train_batches,
)
from rifle.data import builtin
from rifle.data.folder import decode_image, load_image_folder

# ------------------------------------------------------------------------------------------- helpers


def make_folder(
    root: Path, spec: dict[str, dict[str, int]], *, mode: str = "RGB", size=(14, 10), ext: str = "png"
) -> Path:
    """``spec`` = {split: {class: count}}; every image gets distinct content."""
    k = 0
    for split, classes in spec.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                k += 1
                a = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * 7 + k * 13) % 256
                img = Image.fromarray(a.astype(np.uint8), "RGB")
                img = img.convert(mode) if mode != "RGB" else img
                img.save(d / f"img{i:03d}.{ext}")
    return root


def ids_dataset(n: int, res: int = 8, c: int = 3) -> ImageTensorSet:
    """Labels are the sample ids 0..n-1, so batches say which samples they hold."""
    g = torch.Generator().manual_seed(n)
    imgs = torch.randint(0, 256, (n, c, res, res), dtype=torch.uint8, generator=g)
    return ImageTensorSet(imgs, torch.arange(n))


def pattern_dataset(n: int, res: int, c: int = 3) -> ImageTensorSet:
    """Image i holds (i*31 + ch*17 + y*res + x) % 256: every pixel identifies its position."""
    i = torch.arange(n)[:, None, None, None]
    ch = torch.arange(c)[None, :, None, None]
    y = torch.arange(res)[None, None, :, None]
    x = torch.arange(res)[None, None, None, :]
    return ImageTensorSet(((i * 31 + ch * 17 + y * res + x) % 256).to(torch.uint8), torch.arange(n) % 3)


def collect(it):
    xs, ys = zip(*it)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("RIFLE_CACHE_DIR", str(d))
    builtin.clear_memory_cache()
    yield d
    builtin.clear_memory_cache()


# --------------------------------------------------------------------------------------- basics


def test_cache_resolution_and_num_batches():
    assert cache_resolution(224) == 256
    assert cache_resolution(112) == 128
    assert cache_resolution(32) == 37
    with pytest.raises(ValueError):
        cache_resolution(0)
    assert num_batches(10, 3, drop_last=False) == 4
    assert num_batches(10, 3, drop_last=True) == 3
    assert num_batches(9, 3, drop_last=True) == 3
    assert num_batches(0, 3, drop_last=False) == 0
    assert samples_per_rank(11, 3) == 4


def test_image_tensor_set_validation_and_subset():
    ds = ids_dataset(6)
    sub = ds.subset([4, 1])
    assert len(sub) == 2 and sub.labels.tolist() == [4, 1]
    assert torch.equal(sub.images[0], ds.images[4])
    assert len(ds.subset(torch.tensor([], dtype=torch.long))) == 0
    assert ds.subset(ds.labels % 2 == 0).labels.tolist() == [0, 2, 4]
    with pytest.raises(ValueError):
        ImageTensorSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))  # not uint8
    with pytest.raises(ValueError):
        ImageTensorSet(torch.zeros(2, 2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        ImageTensorSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_stratified_split_sizes_and_floors():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3] * 5 + [4] * 1)
    taken, left = stratified_split(labels, 0.1, generator(0, "t"), min_left=1)
    assert len(taken) == round(0.1 * len(labels))  # exact total
    assert sorted(torch.cat([taken, left]).tolist()) == list(range(len(labels)))  # partition
    counts = torch.bincount(labels[taken], minlength=5)
    for c, n in enumerate([50, 30, 20, 5, 1]):
        assert abs(int(counts[c]) - 0.1 * n) < 1  # proportional within rounding
    assert int(counts[4]) == 0  # the single-image class keeps its image on the "left" side
    # many tiny classes: largest remainder still takes the target, not round(0.5)=0 per class
    tiny = torch.arange(40).repeat_interleave(5)
    t2, _ = stratified_split(tiny, 0.1, generator(0, "t"), min_left=1)
    assert len(t2) == 20
    # min_taken: every class keeps at least one
    keep, _ = stratified_split(labels, 0.01, generator(0, "t"), min_taken=1)
    assert set(labels[keep].tolist()) == {0, 1, 2, 3, 4}
    # deterministic per generator seed, different across seeds
    a, _ = stratified_split(labels, 0.3, generator(1, "t"))
    b, _ = stratified_split(labels, 0.3, generator(1, "t"))
    c, _ = stratified_split(labels, 0.3, generator(2, "t"))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------- build_data


def test_build_data_digits_split_determinism_and_stratification():
    b1 = build_data("digits", 16, seed=3)
    b2 = build_data("digits", 16, seed=3)
    b3 = build_data("digits", 16, seed=4)
    assert isinstance(b1, DataBundle) and b1.num_classes == 10 and b1.classes == [str(i) for i in range(10)]
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(b1, s).images, getattr(b2, s).images)
        assert torch.equal(getattr(b1, s).labels, getattr(b2, s).labels)
    assert not torch.equal(b1.val.images, b3.val.images)  # another seed carves another val
    assert torch.equal(b1.test.images, b3.test.images)  # the test split is fixed
    n_fixed_train = len(b1.train) + len(b1.val)
    assert len(b1.train) + len(b1.val) + len(b1.test) == 1797
    assert len(b1.val) == round(0.1 * n_fixed_train)
    assert b1.info["sizes"] == {"train": len(b1.train), "val": len(b1.val), "test": len(b1.test)}
    assert b1.info["val"].startswith("carved 10% stratified seed 3")
    assert b1.info["cache_resolution"] == 18 and b1.train.images.shape[-1] == 18
    # stratified: per class, val holds ~10% of that class's (train + val) images
    tv = torch.bincount(torch.cat([b1.train.labels, b1.val.labels]), minlength=10)
    v = torch.bincount(b1.val.labels, minlength=10)
    assert ((v.float() - 0.1 * tv.float()).abs() < 1).all(), (v, tv)


def test_build_data_val_fraction_zero_and_train_fraction():
    full = build_data("digits", 8, seed=0, val_fraction=0.0)
    assert len(full.val) == 0 and full.val.images.shape[1:] == full.train.images.shape[1:]
    half = build_data("digits", 8, seed=0, val_fraction=0.0, train_fraction=0.5)
    assert len(half.train) == round(0.5 * len(full.train))
    ratio = torch.bincount(half.train.labels, minlength=10).float() / torch.bincount(
        full.train.labels, minlength=10
    )
    assert ((ratio - 0.5).abs() < 0.02).all()
    tiny = build_data("digits", 8, seed=0, train_fraction=0.001)
    assert torch.bincount(tiny.train.labels, minlength=10).tolist() == [1] * 10  # >= 1 per class
    assert tiny.info["train_fraction"] == 0.001
    other = build_data("digits", 8, seed=1, val_fraction=0.0, train_fraction=0.5)
    assert not torch.equal(half.train.images, other.train.images)
    assert len(half.test) == len(full.test)


@pytest.mark.parametrize(
    "kw",
    [
        dict(val_fraction=1.0),
        dict(val_fraction=-0.1),
        dict(train_fraction=0.0),
        dict(train_fraction=1.5),
        dict(val_fraction=float("nan")),
    ],
)
def test_build_data_rejects_bad_fractions(kw):
    with pytest.raises(DataError, match="fraction"):
        build_data("digits", 8, **kw)


def test_unknown_dataset_suggests_builtin(tmp_path):
    with pytest.raises(DataError) as e:
        build_data("elvp", 32)
    msg = str(e.value)
    assert "'elpv'" in msg and "ROOT/train/<class>" in msg
    with pytest.raises(DataError, match="no such path"):
        build_data(str(tmp_path / "nope"), 32)
    assert set(BUILTIN) == {"elpv", "digits"}


# -------------------------------------------------------------------------------- train batches


def test_train_batches_deterministic_and_epoch_dependent():
    ds = pattern_dataset(23, 10)
    kw = dict(seed=5, channels_last=False)
    a = collect(train_batches(ds, 4, 6, 0.5, 0.5, epoch=0, **kw))
    b = collect(train_batches(ds, 4, 6, 0.5, 0.5, epoch=0, **kw))
    c = collect(train_batches(ds, 4, 6, 0.5, 0.5, epoch=1, **kw))
    d = collect(train_batches(ds, 4, 6, 0.5, 0.5, epoch=0, seed=6, channels_last=False))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], d[0])
    # the batch size only cuts the same stream differently
    e = collect(train_batches(ds, 7, 6, 0.5, 0.5, epoch=0, **kw))
    assert torch.equal(a[0], e[0]) and torch.equal(a[1], e[1])
    assert a[0].shape == (23, 3, 6, 6) and a[0].dtype == torch.float32 and a[1].dtype == torch.int64


def test_train_batches_crop_and_flip_match_hand_computation():
    n, r, s, seed, epoch = 40, 10, 6, 11, 2
    ds = pattern_dataset(n, r)
    ds = ImageTensorSet(ds.images, torch.arange(n))  # labels = ids
    xs, ys = collect(train_batches(ds, 8, s, 0.0, 1.0, seed=seed, epoch=epoch))
    order = torch.randperm(n, generator=generator(seed, "order", epoch))
    g = generator(seed, "augment", epoch)
    top = torch.randint(0, r - s + 1, (n,), generator=g)
    left = torch.randint(0, r - s + 1, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g).bool()
    assert ys.tolist() == order.tolist()
    for x, i in zip(xs, ys.tolist()):
        t, lft = int(top[i]), int(left[i])
        expect = ds.images[i, :, t : t + s, lft : lft + s]
        if flip[i]:
            expect = expect.flip(-1)
        assert torch.equal((x * 255).round().to(torch.uint8), expect), i
    assert 0 < int(flip.sum()) < n and len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1


def test_normalisation_channels_last_and_grayscale():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = pattern_dataset(5, 8)
    x, _ = next(eval_batches(rgb, 5, 8, mean, std))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expect = (rgb.images.float() / 255 - m) / s
    assert torch.allclose(x, expect, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    x2, _ = next(eval_batches(rgb, 5, 8, mean, std, channels_last=False))
    assert x2.is_contiguous() and torch.allclose(x2, expect, atol=1e-5)
    gray = pattern_dataset(5, 8, c=1)
    for cl in (True, False):
        xg, _ = next(eval_batches(gray, 5, 8, 0.5, 0.25, channels_last=cl))
        assert xg.shape == (5, 3, 8, 8)
        assert torch.equal(xg[:, 0], xg[:, 1]) and torch.equal(xg[:, 0], xg[:, 2])
        assert torch.allclose(xg[:, 0], (gray.images[:, 0].float() / 255 - 0.5) / 0.25, atol=1e-5)
        assert xg.is_contiguous(memory_format=torch.channels_last) == cl
        xt, _ = next(train_batches(gray, 5, 6, mean, std, seed=0, epoch=0, channels_last=cl))
        assert xt.shape == (5, 3, 6, 6)
        # per-channel mean/std applied to the replicated gray channel
        back = xt * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        assert torch.allclose(back[:, 0], back[:, 2], atol=1e-5)
    with pytest.raises(ValueError):
        train_batches(rgb, 2, 9, mean, std, seed=0, epoch=0)  # crop larger than the cache
    with pytest.raises(ValueError):
        eval_batches(rgb, 2, 8, (0.5, 0.5), std)


@pytest.mark.parametrize("r", [9, 10, 11])
def test_eval_center_crop_exact(r):
    ds = pattern_dataset(7, r)
    xs, ys = collect(eval_batches(ds, 3, 6, 0.0, 1.0))
    assert ys.tolist() == ds.labels.tolist()  # in order
    expect = TF.center_crop(ds.images, [6, 6])
    assert torch.equal((xs * 255).round().to(torch.uint8), expect)


def test_train_sharding_like_distributed_sampler():
    ds = ids_dataset(10)
    shards = [
        collect(train_batches(ds, 3, 8, 0.5, 0.5, seed=1, epoch=4, rank=k, world_size=2))[1] for k in range(2)
    ]
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert sorted(shards[0].tolist() + shards[1].tolist()) == list(range(10))
    full = collect(train_batches(ds, 3, 8, 0.5, 0.5, seed=1, epoch=4))[1]
    assert shards[0].tolist() == full[0::2].tolist()  # slices of one permutation
    # padding by wrapping: 11 samples on 3 ranks -> 4 each, all covered
    ds11 = ids_dataset(11)
    parts = [
        collect(train_batches(ds11, 2, 8, 0.5, 0.5, seed=1, epoch=0, rank=k, world_size=3))[1]
        for k in range(3)
    ]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set(torch.cat(parts).tolist()) == set(range(11))
    # the same sample gets the same augmentation on every rank layout
    x_full = dict(zip(full.tolist(), collect(train_batches(ds, 3, 6, 0.5, 0.5, seed=1, epoch=4))[0]))
    xr, yr = collect(train_batches(ds, 3, 6, 0.5, 0.5, seed=1, epoch=4, rank=1, world_size=2))
    for x, i in zip(xr, yr.tolist()):
        assert torch.equal(x, x_full[i])
    with pytest.raises(ValueError):
        train_batches(ds, 3, 8, 0.5, 0.5, seed=1, epoch=0, rank=2, world_size=2)


def test_drop_last_and_eval_sharding():
    ds = ids_dataset(10)
    assert len(list(train_batches(ds, 4, 8, 0.5, 0.5, seed=0, epoch=0, drop_last=True))) == 2
    assert len(list(train_batches(ds, 4, 8, 0.5, 0.5, seed=0, epoch=0))) == 3
    parts = [collect(eval_batches(ds, 2, 8, 0.5, 0.5, rank=k, world_size=3))[1].tolist() for k in range(3)]
    assert sum(parts, []) == list(range(10))  # contiguous blocks, each sample once, no padding
    assert [len(p) for p in parts] == [3, 3, 4]


# --------------------------------------------------------------------------------- image folders


def test_load_image_folder_mixed_channels_and_val(tmp_path):
    root = make_folder(
        tmp_path / "ds", {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 1}, "val": {"dog": 1}}
    )
    Image.new("L", (9, 9), 77).save(root / "train" / "dog" / "gray.JPG")  # grayscale + upper-case ext
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".hidden.png").write_bytes(b"junk")  # hidden: ignored
    splits, classes, info = load_image_folder(root, 8)
    assert classes == ["cat", "dog"]
    assert set(splits) == {"train", "test", "val"}
    assert splits["train"].images.shape == (6, 3, 8, 8)  # mixed gray/RGB -> 3 channels
    assert splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert info["counts"]["train"] == {"cat": 3, "dog": 3} and info["counts"]["val"] == {"dog": 1}
    assert info["missing"]["val"] == ["cat"] and len(info["ignored_files"]) == 1
    gray = splits["train"].images[3]  # dog/gray.JPG sorts before dog/img000.png
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert (gray.int() - 77).abs().max() <= 2
    b = build_data(str(root), 7)
    assert b.info["val"] == "folder" and len(b.val) == 1 and b.classes == ["cat", "dog"]


def test_grayscale_folder_keeps_one_channel_and_carves_val(tmp_path):
    root = make_folder(tmp_path / "g", {"train": {"a": 10, "b": 10}, "test": {"a": 2, "b": 2}}, mode="L")
    b = build_data(str(root), 8, seed=0, val_fraction=0.2)
    assert b.train.images.shape[1] == 1 and b.info["channels"] == 1
    assert torch.bincount(b.val.labels).tolist() == [2, 2]
    x, _ = next(train_batches(b.train, 4, 8, 0.5, 0.5, seed=0, epoch=0))
    assert x.shape == (4, 3, 8, 8)


def test_decode_image_modes_and_resize(tmp_path):
    # non-square: 40x20 -> shorter side 8 -> 16x8 -> centre 8x8 keeps the middle (value 200)
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 200
    Image.fromarray(a).save(tmp_path / "wide.png")
    t = decode_image(tmp_path / "wide.png", 8)
    assert t.shape == (3, 8, 8) and t.dtype == torch.uint8
    assert (t[:, :, 1:7] == 200).all() and (t[:, :, [0, 7]] > 100).all()
    # same pixels as torchvision's Resize(res) + CenterCrop(res) on the PIL image, wide and tall
    rng = np.random.default_rng(0)
    for name, shape in (("w.png", (21, 37, 3)), ("t.png", (45, 16, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            ref = TF.pil_to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), 11), [11, 11]))
        assert torch.equal(decode_image(tmp_path / name, 11), ref), name
    # 16-bit grayscale is scaled, not clipped
    Image.fromarray(np.full((6, 6), 65535, np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(np.full((6, 6), 32896, np.uint16)).save(tmp_path / "g16b.png")
    assert decode_image(tmp_path / "g16.png", 6).shape == (1, 6, 6)
    assert int(decode_image(tmp_path / "g16.png", 6).max()) == 255
    assert int(decode_image(tmp_path / "g16b.png", 6).max()) == 128
    # alpha dropped, palette expanded, 1-bit is grayscale
    Image.new("RGBA", (5, 5), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert decode_image(tmp_path / "rgba.png", 5)[:, 0, 0].tolist() == [10, 20, 30]
    p = Image.new("P", (5, 5))
    p.putpalette([0, 0, 0, 250, 100, 50] + [0] * 762)
    p.paste(1, (0, 0, 5, 5))
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png", transparency=0)
    assert decode_image(tmp_path / "pal.png", 5)[:, 2, 2].tolist() == [250, 100, 50]
    Image.new("1", (5, 5), 1).save(tmp_path / "bw.bmp")
    assert decode_image(tmp_path / "bw.bmp", 5).tolist() == torch.full((1, 5, 5), 255).tolist()
    Image.new("RGB", (64, 48), (0, 128, 255)).save(tmp_path / "big.jpg", quality=95)
    j = decode_image(tmp_path / "big.jpg", 8)
    assert j.shape == (3, 8, 8) and (j.float() - torch.tensor([0, 128, 255]).view(3, 1, 1)).abs().max() < 6


# ---------------------------------------------------------------------------------- folder errors


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8)
    r1 = make_folder(tmp_path / "r1", {"test": {"a": 1}})
    with pytest.raises(DataError, match=r"missing train/ folder") as e:
        load_image_folder(r1, 8)
    assert "expected layout" in str(e.value)
    r2 = make_folder(tmp_path / "r2", {"train": {"a": 1}})
    with pytest.raises(DataError, match=r"missing test/ folder"):
        load_image_folder(r2, 8)
    r3 = make_folder(tmp_path / "r3", {"train": {"a": 1}, "test": {"a": 1}})
    (r3 / "train" / "empty").mkdir()
    (r3 / "train" / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as e:
        load_image_folder(r3, 8)
    assert str(r3 / "train" / "empty") in str(e.value)
    r4 = make_folder(tmp_path / "r4", {"train": {"a": 1}, "test": {"a": 1, "zebra": 1}})
    with pytest.raises(DataError, match="zebra"):
        load_image_folder(r4, 8)


def test_corrupt_and_truncated_images(tmp_path):
    root = make_folder(tmp_path / "c", {"train": {"a": 3, "b": 2}, "test": {"a": 1, "b": 1}}, size=(40, 40))
    bad = root / "train" / "a" / "broken.png"
    bad.write_bytes(b"this is not a png")
    good = (root / "train" / "b" / "img000.png").read_bytes()
    trunc = root / "train" / "b" / "trunc.png"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as e:
        load_image_folder(root, 8)
    msg = str(e.value)
    assert str(bad) in msg and str(trunc) in msg and "--skip-bad-images" in msg
    with pytest.warns(UserWarning, match="skipped 2"):
        splits, _, info = load_image_folder(root, 8, skip_bad_images=True)
    assert sorted(info["skipped"]) == sorted([str(bad), str(trunc)])
    assert len(splits["train"]) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = build_data(str(root), 8, skip_bad_images=True)
    assert len(b.info["skipped"]) == 2


# ------------------------------------------------------------------------------------- built-ins


def test_digits_loader():
    splits, classes, info = builtin.load_digits_dataset(12)
    assert classes == [str(i) for i in range(10)]
    tr, te = splits["train"], splits["test"]
    assert len(tr) + len(te) == 1797 and len(te) == round(0.25 * 1797)
    assert tr.images.shape[1:] == (1, 12, 12) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255
    assert torch.bincount(te.labels, minlength=10).min() >= 40


def test_elpv_loader_fixed_split_and_disk_cache(cache_dir):
    splits, classes, info = builtin.load_elpv(32)
    assert classes == ["functional", "possibly_defective", "likely_defective", "defective"]
    tr, te = splits["train"], splits["test"]
    assert len(tr) + len(te) == 2624
    assert (len(tr), len(te)) == (1968, 656)
    assert tr.images.shape[1:] == (1, 32, 32) and tr.images.dtype == torch.uint8
    assert sorted(set(tr.labels.tolist())) == [0, 1, 2, 3]
    assert info["license"] == "CC BY-NC-SA 4.0" and info["loaded_from"] == "decoded"
    assert info["counts"]["test"] == {
        "functional": 377,
        "possibly_defective": 74,
        "likely_defective": 26,
        "defective": 179,
    }
    files = [f.name for f in cache_dir.iterdir() if f.name != ".locks"]
    assert files == [Path(info["cache_file"]).name]  # one decode cache entry, no temp files left
    again = builtin.load_elpv(32)  # in-process cache: same tensors
    assert again[0]["train"].images is tr.images
    builtin.clear_memory_cache()
    disk, _, info2 = builtin.load_elpv(32)
    assert info2["loaded_from"] == "disk cache"
    assert torch.equal(disk["test"].images, te.images) and torch.equal(disk["train"].labels, tr.labels)
    # the run seed never moves the test split
    b1, b2 = build_data("elpv", 28, seed=0), build_data("elpv", 28, seed=1)
    assert torch.equal(b1.test.images, b2.test.images) and len(b1.test) == 656
    assert not torch.equal(b1.val.images, b2.val.images)


# --------------------------------------------------------------- inputs that cannot mean what is meant
def test_a_one_class_folder_is_refused(tmp_path, capsys):
    """It trained to loss 0 and "test 1.0000" with exit 0: there is nothing to classify."""
    from conftest import run_cli

    root = make_folder(tmp_path / "one", {"train": {"cat": 4}, "test": {"cat": 2}})
    with pytest.raises(DataError) as e:
        load_image_folder(root, 8)
    assert str(e.value).startswith(f"{root / 'train'} has one class folder (cat): nothing to classify")
    code, _, err = run_cli(
        ["train", "--data", root, "--model", "tiny_cnn", "--epochs", "1", "--out", tmp_path / "run"], capsys
    )
    assert code == 2 and f"{root / 'train'} has one class folder (cat)" in err, err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_split_folder_as_data_suggests_its_parent(tmp_path):
    root = make_folder(tmp_path / "my_photos", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    for split in ("train", "test"):
        with pytest.raises(DataError) as e:
            build_data(str(root / split), 8)
        assert (
            f"{root / split} looks like the {split}/ split of the dataset {root}: pass that folder "
            f"instead (--data {root})"
        ) in str(e.value)
    with pytest.raises(DataError) as e:  # a folder that is no split of a dataset gets no such hint
        load_image_folder(root / "train" / "a", 8)
    assert "looks like" not in str(e.value)


def test_splits_that_cannot_select_a_model_warn(tmp_path):
    # 22 train images carved at 10 %: round(2.2) = 2 val images by largest remainder, a 1 and b 1, none of c
    # (c's remainder 0.2 is the smallest); the test split has no c at all
    root = make_folder(tmp_path / "few", {"train": {"a": 10, "b": 10, "c": 2}, "test": {"a": 2, "b": 2}})
    with pytest.warns(UserWarning) as caught:
        b = build_data(str(root), 8, seed=0, val_fraction=0.1)
    assert b.val.class_counts(3) == [1, 1, 0] and b.test.class_counts(3) == [2, 2, 0]
    val = "the validation split (carved 10% stratified seed 0)"
    expected = [
        f"{val} has only 2 images: validation accuracy moves in steps of 50 points, so the epoch it picks "
        f"(best_val_epoch, test_acc_at_best_val) is largely chance; final_test_acc does not use it. Use a "
        f"larger --val-fraction (val_fraction) or a val/ folder: at least 50 images",
        f"{val} has no images of 1 of the 3 classes (c): the best epoch is picked without them. Use a larger "
        f"--val-fraction (val_fraction) or a val/ folder: images of every class",
        "the test split has no images of 1 of the 3 training classes (c): test accuracy does not measure how "
        "well they are recognised (a test image predicted as one of them still counts as an error)",
    ]
    assert [str(w.message) for w in caught] == expected
    assert b.info["warnings"] == expected  # recorded with the run: summary.json's data_info
    # a val/ folder of 50 images holding every class, and no val at all (val_fraction 0), say nothing
    make_folder(root, {"val": {"a": 20, "b": 20, "c": 10}, "test": {"c": 1}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_data(str(root), 8).info["warnings"] == []
    root2 = make_folder(tmp_path / "noval", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_data(str(root2), 8, val_fraction=0).info["warnings"] == []
    with pytest.warns(
        UserWarning,
        match=r"the val/ folder has only 1 image: validation accuracy moves in "
        r"steps of 100 points.* Use a val/ folder with at least 50 images",
    ):
        build_data(
            str(
                make_folder(
                    tmp_path / "v1", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}, "val": {"a": 1}}
                )
            ),
            8,
        )


def test_split_warnings_are_printed_once_and_recorded(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import SRC

    root = make_folder(tmp_path / "few", {"train": {"a": 10, "b": 10}, "test": {"a": 2, "b": 2}})
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rifle",
            "train",
            "--data",
            str(root),
            "--model",
            "tiny_cnn",
            "--image-size",
            "16",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    note = "warning: the validation split (carved 10% stratified seed 0) has only 2 images"
    assert proc.stderr.count(note) == 1, proc.stderr
    assert json.loads((out / "summary.json").read_text())["data_info"]["warnings"][0].startswith(note[9:])
