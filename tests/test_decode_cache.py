"""The decode cache (rifle.data.disk_cache): decode once, memory-mapped, atomic, invalidated by a change,
a clear error on a full disk, and lazy subsets that give exactly the batches of copied ones."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SRC, make_image_folder, run_cli
from rifle.data import (
    DataError,
    ImageTensorSet,
    build_data,
    decode_files,
    decode_image,
    eval_batches,
    load_image_folder,
    resolve_cache_dir,
    train_batches,
)
from rifle.data import disk_cache

pytestmark = pytest.mark.filterwarnings("ignore:the validation split")


def age(root: Path, seconds: float = 100.0) -> None:
    """Set every file's mtime ``seconds`` back: files changed in the last 2 s are never cached."""
    t = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (t, t))


def folder(tmp_path: Path, name: str = "ds") -> Path:
    root = make_image_folder(tmp_path / name, per_class=(4, 2), size=(13, 9))
    Image.new("L", (10, 12), 90).save(root / "train" / "dog" / "gray.png")  # mixed: set is 3-channel
    age(root)
    return root


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def temps(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")] if cache.exists() else []


def image_paths(root: Path) -> list[Path]:
    return [
        f
        for split in ("train", "test")
        for c in sorted((root / split).iterdir())
        for f in sorted(c.iterdir())
    ]


def expected_images(paths: list[Path], res: int) -> torch.Tensor:
    """Every file decoded on its own, grayscale broadcast to 3 channels (the folder's rule by hand)."""
    return torch.stack([decode_image(p, res).expand(3, res, res) for p in paths])


def test_second_build_reads_the_cache_and_gives_the_same_bytes(tmp_path, calls):
    root, cache = folder(tmp_path), tmp_path / "cache"
    paths = image_paths(root)
    first = build_data(str(root), 8, cache_dir=cache)
    assert calls[0] == len(paths) == 19 and len(entries(cache)) == 1 and temps(cache) == []
    entry = cache / entries(cache)[0]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["shape"] == [19, 3, 9, 9] and (entry / "images.u8").stat().st_size == 19 * 3 * 9 * 9
    mtime = (entry / "images.u8").stat().st_mtime_ns
    second = build_data(str(root), 8, cache_dir=cache)
    assert calls[0] == 19  # nothing decoded the second time
    assert (entry / "images.u8").stat().st_mtime_ns == mtime and len(entries(cache)) == 1
    off = build_data(str(root), 8, cache_dir="off")
    assert calls[0] == 38 and len(entries(cache)) == 1
    for split in ("train", "val", "test"):
        a, b, c = (getattr(x, split) for x in (first, second, off))
        assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
        assert torch.equal(a.labels, c.labels)
    # the bytes are those of decoding every file by hand; the splits are views of the mapped file
    splits, _, _ = load_image_folder(root, 9, cache_dir=cache)
    expect = expected_images(paths, 9)
    assert torch.equal(torch.cat([splits["train"].images, splits["test"].images]), expect)
    assert calls[0] == 38
    mapped = np.memmap(entry / "images.u8", dtype=np.uint8, mode="r", shape=(19, 3, 9, 9))
    assert torch.equal(torch.from_numpy(np.array(mapped)), expect)


def test_a_changed_file_gives_a_new_entry_and_its_new_pixels(tmp_path, calls):
    root, cache = folder(tmp_path), tmp_path / "cache"
    target = root / "test" / "fox" / "1.png"
    splits, _, _ = load_image_folder(root, 9, cache_dir=cache)
    assert len(entries(cache)) == 1
    Image.new("RGB", (13, 9), (250, 5, 5)).save(target)  # other pixels
    t = time.time() - 50
    os.utime(target, (t, t))
    again, _, _ = load_image_folder(root, 9, cache_dir=cache)
    assert len(entries(cache)) == 2 and calls[0] == 38
    assert torch.equal(again["test"].images[-1], torch.tensor([250, 5, 5]).view(3, 1, 1).expand(3, 9, 9))
    assert not torch.equal(again["test"].images[-1], splits["test"].images[-1])
    assert torch.equal(again["train"].images, splits["train"].images)
    t = time.time() - 20
    os.utime(target, (t, t))  # the same bytes, another modification time: decoded again
    load_image_folder(root, 9, cache_dir=cache)
    assert len(entries(cache)) == 3 and calls[0] == 57
    load_image_folder(root, 10, cache_dir=cache)  # another resolution: another entry
    assert len(entries(cache)) == 4 and calls[0] == 76


def test_files_changed_in_the_last_seconds_are_not_cached(tmp_path, calls):
    """Within one mtime tick a file could change again unseen: such files are decoded, not cached."""
    root = make_image_folder(tmp_path / "fresh", per_class=(2, 1), size=(8, 8))
    cache = tmp_path / "cache"
    dec = decode_files(image_paths(root), 6, cache_dir=cache)
    assert dec.source == "decoded (not cached)" and dec.entry is None
    assert entries(cache) == [] and temps(cache) == []
    age(root)
    assert decode_files(image_paths(root), 6, cache_dir=cache).source == "decoded"
    again = decode_files(image_paths(root), 6, cache_dir=cache)
    assert again.source == "disk cache" and torch.equal(again.images, dec.images) and calls[0] == 18


def test_unreadable_files_are_recorded_in_the_entry_and_missing_ones_not_cached(tmp_path, calls):
    root, cache = folder(tmp_path), tmp_path / "cache"
    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not a png")
    age(root)
    with pytest.raises(DataError, match="cannot read 1 image file"):
        build_data(str(root), 8, cache_dir=cache)
    assert calls[0] == 20 and len(entries(cache)) == 1  # the failure is a property of the bytes: kept
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        b = build_data(str(root), 8, skip_bad_images=True, cache_dir=cache)
    assert calls[0] == 20 and b.info["skipped"] == [str(bad)]
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        off = build_data(str(root), 8, cache_dir="off", skip_bad_images=True)
    assert torch.equal(b.train.images, off.train.images) and torch.equal(b.test.images, off.test.images)
    # a file that is not there (or not readable) is an error of the moment, not of its content
    paths = image_paths(root)[:3] + [root / "nope.png"]
    dec = decode_files(paths, 5, cache_dir=cache)
    assert dec.ok == [0, 1, 2] and dec.errors[0][0] == root / "nope.png"
    assert dec.source == "decoded (not cached)" and "FileNotFoundError" in dec.errors[0][1]
    assert decode_files(paths, 5, cache_dir=cache).source == "decoded (not cached)"


RACER = """
import hashlib, sys, time
from pathlib import Path
import rifle.data.disk_cache as dc
from rifle.data.folder import decode_image
root, cache, lock = Path(sys.argv[1]), sys.argv[2], sys.argv[5]
mine, other = Path(sys.argv[3]), Path(sys.argv[4])
dc._USE_LOCK = lock == "lock"
def slow(p, res):  # long enough for the two processes to overlap
    time.sleep(0.05)
    return decode_image(p, res)
dc.decode_image = slow
def wait_for(path):
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.001)
rename = dc.os.rename
def both_rename(a, b):  # no lock: both have decoded a complete copy and rename it at the same moment
    Path(str(mine) + ".renaming").touch()
    wait_for(Path(str(other) + ".renaming"))
    rename(a, b)
if lock != "lock":
    dc.os.rename = both_rename
paths = sorted(p for p in root.rglob("*.png"))
mine.touch()
wait_for(other)
d = dc.decode_files(paths, 9, cache_dir=cache)
print(d.source, hashlib.sha256(d.images.numpy().tobytes()).hexdigest(), d.ok == list(range(len(paths))))
"""


@pytest.mark.parametrize("lock", ["lock", "no-lock"])
def test_two_processes_deciding_at_once_get_the_same_bytes_and_one_entry(tmp_path, lock):
    root, cache = folder(tmp_path), tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(root), str(cache), str(ready[i]), str(ready[1 - i]), lock],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    results = [o.split() for o, _ in outs]
    expect = hashlib.sha256(expected_images(sorted(root.rglob("*.png")), 9).numpy().tobytes()).hexdigest()
    assert [r[-2:] for r in results] == [[expect, "True"]] * 2
    sources = sorted(r[0] for r in results)
    if lock == "lock":  # one decoded, the other waited for its entry
        assert sources == ["decoded", "disk"] and "waiting for another process" in "".join(e for _, e in outs)
    else:  # both decoded and renamed: one rename won, the other copy was discarded
        assert sources == ["decoded", "decoded"]
    assert len(entries(cache)) == 1 and temps(cache) == []
    dec = decode_files(sorted(root.rglob("*.png")), 9, cache_dir=cache)
    assert dec.source == "disk cache" and hashlib.sha256(dec.images.numpy().tobytes()).hexdigest() == expect


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path, calls):
    root, cache = folder(tmp_path), tmp_path / "cache"
    paths = image_paths(root)
    key, _ = disk_cache._stat_key(paths, 9)
    code = (
        "import sys, time\nfrom pathlib import Path\nimport rifle.data.disk_cache as dc\n"
        f"lock = dc._Lock(Path({str(cache)!r}), {key!r})\n"
        "print('held', flush=True)\ntime.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        stale = cache / f".tmp-{key[:16]}-{socket.gethostname()}-{holder.pid}-deadbeef"
        stale.mkdir()  # what a writer killed half-way leaves
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    dec = decode_files(paths, 9, cache_dir=cache)
    assert dec.source == "decoded" and calls[0] == 19
    assert not stale.exists()  # its writer is dead: removed


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch, calls):
    root, cache = folder(tmp_path), tmp_path / "cache"
    written = []

    def full(f, chunk):
        written.append(len(chunk))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_cache, "_write_chunk", full)
    with pytest.raises(DataError) as e:
        build_data(str(root), 8, cache_dir=cache)
    msg = str(e.value)
    assert f"cannot write the decode cache in {cache}: No space left on device" in msg
    assert (
        f"needs up to {19 * 3 * 9 * 9} bytes" in msg and "--cache-dir off" in msg and "--cache-dir DIR" in msg
    )
    assert written and entries(cache) == [] and temps(cache) == []
    assert calls[0] == 19  # decoded, then the write failed
    monkeypatch.undo()
    calls[0] = 0
    # not enough free space: refused before decoding anything
    monkeypatch.setattr(disk_cache, "decode_image", lambda p, r: calls.__setitem__(0, calls[0] + 1))
    monkeypatch.setattr(
        disk_cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 100, "total": 1, "used": 0})()
    )
    with pytest.raises(DataError, match=f"needs up to {19 * 3 * 9 * 9} bytes"):
        build_data(str(root), 8, cache_dir=cache)
    assert calls[0] == 0 and entries(cache) == [] and temps(cache) == []


def test_cache_off_and_the_default_folder(tmp_path, monkeypatch):
    root, cache = folder(tmp_path), tmp_path / "cache"
    monkeypatch.setenv("RIFLE_CACHE_DIR", str(cache))
    assert resolve_cache_dir() == cache and resolve_cache_dir("") == cache
    assert resolve_cache_dir("off") is None and resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("RIFLE_CACHE_DIR", "OFF")
    assert resolve_cache_dir() is None and resolve_cache_dir(cache) == cache
    b = build_data(str(root), 8)
    assert not cache.exists() and b.train.channels == 3
    monkeypatch.delenv("RIFLE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "rifle"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_cache_dir() == Path.home() / ".cache" / "rifle"


def test_an_unusable_entry_is_rebuilt(tmp_path, calls):
    root, cache = folder(tmp_path), tmp_path / "cache"
    first = decode_files(image_paths(root), 9, cache_dir=cache)
    expect = first.images.clone()
    del first
    data = cache / entries(cache)[0] / "images.u8"
    data.write_bytes(data.read_bytes()[:-5])  # truncated
    with pytest.warns(UserWarning, match="ignoring unusable decode cache entry"):
        again = decode_files(image_paths(root), 9, cache_dir=cache)
    assert again.source == "decoded" and calls[0] == 38 and torch.equal(again.images, expect)
    assert len(entries(cache)) == 1 and temps(cache) == []


def copied(ds: ImageTensorSet, idx) -> ImageTensorSet:
    idx = torch.as_tensor(idx)
    return ImageTensorSet(ds.images[idx].clone(), ds.labels[idx].clone())


def batches(ds: ImageTensorSet, seed: int):
    tr = list(train_batches(ds, 5, 6, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), seed=seed, epoch=1))
    ev = list(eval_batches(ds, 4, 6, 0.5, 0.25))
    tr2 = list(
        train_batches(ds, 3, 5, 0.5, 0.5, seed=seed, epoch=0, rank=1, world_size=2, channels_last=False)
    )
    return tr + ev + tr2


@pytest.mark.parametrize("channels", [1, 3])
def test_a_lazy_subset_gives_exactly_the_batches_of_a_copied_one(channels):
    g = torch.Generator().manual_seed(0)
    base = ImageTensorSet(
        torch.randint(0, 256, (30, channels, 8, 8), generator=g, dtype=torch.uint8), torch.arange(30) % 4
    )
    idx = torch.randperm(30, generator=g)[:17]
    lazy, copy = base.subset(idx), copied(base, idx)
    assert lazy.index is not None and lazy.base is base.base  # nothing copied
    inner = torch.tensor([3, 0, 16, 5, 9, 11, 2])
    for a, b in (
        (lazy, copy),
        (lazy.subset(inner), copied(copy, inner)),
        (lazy.subset(lazy.labels == 1), copied(copy, copy.labels == 1)),
    ):
        assert len(a) == len(b) and a.class_counts(4) == b.class_counts(4)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        for seed in (0, 7):
            for (xa, ya), (xb, yb) in zip(batches(a, seed), batches(b, seed), strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    relabelled = lazy.with_labels(torch.zeros(17, dtype=torch.int64))
    assert relabelled.base is base.base and torch.equal(relabelled.index, lazy.index)
    with pytest.raises(ValueError, match="index out of range"):
        ImageTensorSet(base.base, torch.zeros(1, dtype=torch.int64), index=torch.tensor([30]))


def test_build_data_from_the_cache_gives_the_batches_of_an_in_memory_build(tmp_path):
    root, cache = folder(tmp_path), tmp_path / "cache"
    build_data(str(root), 8, cache_dir=cache, val_fraction=0.25, train_fraction=0.7)
    mapped = build_data(str(root), 8, cache_dir=cache, val_fraction=0.25, train_fraction=0.7, label_noise=0.3)
    memory = build_data(str(root), 8, cache_dir="off", val_fraction=0.25, train_fraction=0.7, label_noise=0.3)
    assert mapped.train.index is not None and mapped.train.base.shape[0] == 13  # a view of the train block
    for split in ("train", "val", "test"):
        a, b = getattr(mapped, split), getattr(memory, split)
        assert torch.equal(a.labels, b.labels)
        for (xa, ya), (xb, yb) in zip(batches(a, 3), batches(b, 3), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_cli_cache_dir_flag_and_a_resume_with_another_cache_dir(tmp_path, capsys):
    root, cache = folder(tmp_path), tmp_path / "cache"
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "tiny_cnn",
        "--epochs",
        "1",
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--no-pretrained",
        "--quiet",
    ]
    argv += ["--data", root, "--out", out]
    code, _, err = run_cli([*argv, "--cache-dir", cache], capsys)
    assert code == 0, err
    assert len(entries(cache)) == 1
    code, _, err = run_cli([*argv, "--resume", "--cache-dir", "off"], capsys)
    assert code == 0, err  # cache_dir is not part of the run's identity
    with pytest.raises(SystemExit):
        run_cli(["train", "--help"], capsys)
    assert "--cache-dir" in capsys.readouterr().out


@pytest.mark.parametrize("cache", ["on", "off"])
def test_a_wrong_channel_prediction_from_the_headers_still_gives_the_rule(tmp_path, monkeypatch, cache):
    """The channel count is guessed from the headers before decoding; a wrong guess decodes again."""
    mixed = folder(tmp_path, "mixed")
    gray = make_image_folder(tmp_path / "gray", per_class=(2, 1), size=(9, 9))
    for p in gray.rglob("*.png"):
        Image.open(p).convert("L").save(p)
    truncated = gray / "train" / "cat" / "rgb.jpg"  # an RGB header, content cut off: skipped
    Image.new("RGB", (40, 40), (10, 200, 30)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:200])
    age(gray)
    where = {"on": str(tmp_path / "c"), "off": "off"}[cache]
    for guess in (1, 3):  # 1 for the mixed folder, 3 for the gray one are wrong
        for root, channels in ((mixed, 3), (gray, 1)):
            paths = image_paths(root)
            ref = decode_files(paths, 7 + guess, cache_dir="off")  # the headers' true guess
            assert ref.images.shape[1] == channels
            with monkeypatch.context() as m:
                m.setattr(disk_cache, "_header_channels", lambda p, g=guess: g)
                got = decode_files(paths, 7 + guess, cache_dir=where)
            assert got.source != "disk cache" and got.ok == ref.ok and got.errors == ref.errors
            assert torch.equal(got.images, ref.images), (root.name, guess)
    assert ref.errors[0][0] == truncated


def test_an_entry_larger_than_ram_and_swap_is_mapped(tmp_path):
    """A copy-on-write mapping of such a file is refused (ENOMEM, the kernel's overcommit check); the
    read-only shared one works and a batch reads only its own pages (the file is sparse: no disk used)."""
    with open("/proc/meminfo") as f:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in f}
    need = (kib["MemTotal"] + kib["SwapTotal"]) * 1024 * 3 // 2
    res = 1024
    m = -(-need // (3 * res * res))
    entry = tmp_path / "entry"
    entry.mkdir()
    with open(entry / "images.u8", "wb") as f:
        f.truncate(m * 3 * res * res)
    meta = {"format": disk_cache.FORMAT, "key": "k", "shape": [m, 3, res, res], "files": m, "errors": []}
    (entry / "meta.json").write_text(json.dumps({**meta, "error_paths": []}))
    dec = disk_cache._open_entry(entry, "k")
    assert dec is not None and dec.images.shape == (m, 3, res, res)
    ds = ImageTensorSet(dec.images, torch.zeros(m, dtype=torch.int64)).subset(torch.tensor([m - 1, 0, 7]))
    x, y = next(train_batches(ds, 3, 896, 0.5, 0.5, seed=0, epoch=0))
    assert x.shape == (3, 3, 896, 896) and bool((x == -1).all())  # zeros normalised: (0 - 0.5) / 0.5


def test_an_unusable_cache_folder_and_the_bench_flag(tmp_path, monkeypatch, capsys):
    root = folder(tmp_path)
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with pytest.raises(
        DataError, match=f"cannot write the decode cache in {blocker / 'sub'}: .*--cache-dir off"
    ):
        build_data(str(root), 8, cache_dir=blocker / "sub")
    monkeypatch.setenv("RIFLE_CACHE_DIR", "unchanged")  # restored after the test
    grid = Path(__file__).resolve().parents[1] / "benchmarks" / "elpv_grid.yaml"
    code, _, err = run_cli(["bench", grid, "--out", tmp_path / "g", "--list", "--cache-dir", "off"], capsys)
    assert code == 0, err
    assert os.environ["RIFLE_CACHE_DIR"] == "off"  # what its runs and workers read
