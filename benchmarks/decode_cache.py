"""The decode cache (issue 22 §2): set-up time of a second run on the same folder vs the first, and the
peak RSS of a run whose decoded images are several times larger than what it stays under.

1. Set-up: a generated folder of ``--images`` small JPEGs (320x240, 10 classes, 80 % train). Each
   measurement is a fresh ``rifle train`` process (tiny_cnn, 112 px, 1 epoch on 5 % of train): the
   seconds from its start to the line it prints just before training ("... train / ... val / ...
   test images"), and the wall time. In order: ``--cache-dir off`` (decoded into memory, as before the
   cache), the first run with the cache (decodes and writes the entry), then two more (read the entry).
   Also ``build_data`` alone in a fresh process, timed after the imports: the folder (cache off,
   first, second) and ``"elpv"`` (first, second).
2. RSS: a generated folder of JPEGs (300x260) whose decoded images at 256 x 256 x 3 (``--image-size
   224``) take ``--rss-gb`` GB; ``rifle train`` (tiny_cnn, training and evaluation batches of 4, 1
   epoch on 1 % of train, no validation split, 100 test images): the first run (decodes into the
   cache), the second (reads it), and
   ``--cache-dir off`` (``--skip-off`` leaves it out: it holds every image in RAM). Peak RSS is the
   process's ``ru_maxrss`` (``os.wait4``), which counts the mapped pages it touched; for scale, the
   peak RSS of a process that only imports what a run imports (``rifle.run``, timm, torchvision).

The files are dated an hour back (an unpacked dataset; files changed in the last 2 s are not cached).
Everything is written under ``--work`` (default: a new folder in the system temp dir), deleted at the
end unless ``--keep``. Usage: ``python benchmarks/decode_cache.py [--images 2500] [--rss-gb 6]``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def make_folder(root: Path, n: int, size: tuple[int, int], test_per_class: int | None = None) -> Path:
    """``n`` JPEGs in ``root/{train,test}/c0..c9``: smooth random colour fields (they compress like
    photos), 20 % (or ``test_per_class`` per class) to test."""
    k = 10

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        c = i % k
        j = i // k
        test = j < test_per_class if test_per_class is not None else j % 5 == 0
        d = root / ("test" if test else "train") / f"c{c}"
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        low[..., c % 3] = 200
        img = Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)
        img.save(d / f"{j:06d}.jpg", quality=90)

    for split in ("train", "test"):
        for c in range(k):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))
    t = time.time() - 3600
    for p in root.rglob("*.jpg"):
        os.utime(p, (t, t))
    return root


def train(data: Path, out: Path, cache: str, extra: list[str]) -> dict:
    """One ``rifle train`` process: seconds to its "train / val / test" line, wall seconds, peak RSS."""
    cmd = [
        sys.executable,
        "-m",
        "rifle",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        cache,
    ]
    cmd += ["--model", "tiny_cnn", "--epochs", "1", "--no-pretrained", "--threads", "2"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    setup, lines = None, []
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        if setup is None and " train / " in line and " test images" in line:
            setup = time.perf_counter() - t0
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd + extra)} failed:\n{''.join(lines[-30:])}")
    return {"setup_s": setup, "wall_s": wall, "maxrss_mb": usage.ru_maxrss / 1024}


def build_in_fresh_process(data: str, image_size: int, cache: str) -> float:
    code = (
        "import sys, time\nfrom rifle.data import build_data\n"
        "t = time.perf_counter(); build_data(sys.argv[1], int(sys.argv[2]), cache_dir=sys.argv[3])\n"
        "print(time.perf_counter() - t)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, data, str(image_size), cache], capture_output=True, text=True, env=ENV
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    return float(out.stdout.split()[-1])


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def setup_time(work: Path, n: int) -> None:
    data = make_folder(work / "small", n, (320, 240))
    cache = work / "cache-small"
    small = ["--image-size", "112", "--train-fraction", "0.05", "--batch-size", "32"]
    rows = [("cache off (decoded in memory)", train(data, work / "runs" / "off", "off", small))]
    for i, what in enumerate(["first (decode + write the entry)", "second (entry)", "third (entry)"]):
        rows.append((what, train(data, work / "runs" / f"s{i}", str(cache), small)))
    print(f"\n### set-up time: {n} JPEGs 320x240 -> 128x128x3 ({du(cache) / 2**20:.0f} MiB entry)\n")
    print("| run | start -> training starts (s) | wall (s) | peak RSS (MiB) |\n|---|---|---|---|")
    for what, r in rows:
        print(f"| {what} | {r['setup_s']:.2f} | {r['wall_s']:.2f} | {r['maxrss_mb']:.0f} |")
    fcache = str(work / "cache-small-2")
    off, cold, warm = (build_in_fresh_process(str(data), 112, c) for c in ("off", fcache, fcache))
    print(
        f"\nbuild_data(folder, 112) after the imports: cache off {off:.2f} s, first with the cache "
        f"{cold:.2f} s, second {warm:.2f} s"
    )
    ecache = str(work / "cache-elpv")
    try:
        cold, warm = (build_in_fresh_process("elpv", 112, ecache) for _ in range(2))
        print(f"\nELPV build_data('elpv', 112) after the imports: first {cold:.2f} s, second {warm:.2f} s")
    except SystemExit as e:
        print(f"\nELPV not measured: {e}")


def rss(work: Path, gb: float, with_off: bool) -> None:
    res, per = 256, 3 * 256 * 256
    n = math.ceil(gb * 1e9 / per)
    free = shutil.disk_usage(work).free
    if free < 1.5 * n * per:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need about {1.5 * n * per / 1e9:.1f} GB")
    t = time.perf_counter()
    data = make_folder(work / "big", n, (300, 260), test_per_class=10)
    print(f"\n(generated {n} JPEGs, {du(data) / 2**20:.0f} MiB, in {time.perf_counter() - t:.0f} s)")
    cache = work / "cache-big"
    big = ["--image-size", "224", "--train-fraction", "0.01", "--val-fraction", "0", "--batch-size", "4"]
    big += ["--eval-batch-size", "4"]  # small batches: tiny_cnn's activations at 224 px take ~1 GB at 16
    rows = [
        ("first (decode + write the entry)", train(data, work / "runs" / "b0", str(cache), big)),
        ("second (entry)", train(data, work / "runs" / "b1", str(cache), big)),
    ]
    if with_off:
        rows.append(("cache off (decoded in memory)", train(data, work / "runs" / "boff", "off", big)))
    p = subprocess.Popen([sys.executable, "-c", "import rifle.run, timm, torchvision"], env=ENV)
    imports = os.wait4(p.pid, 0)[2].ru_maxrss / 1024
    size = du(cache)
    what = f"{n} JPEGs 300x260 -> {res}x{res}x3, decoded {size / 1e9:.2f} GB ({size / 2**20:.0f} MiB)"
    print(f"\n### peak RSS: {what}\n")
    print("| run | start -> training starts (s) | wall (s) | peak RSS (MiB) | decoded / peak RSS |")
    print("|---|---|---|---|---|")
    for what, r in rows:
        ratio = size / 2**20 / r["maxrss_mb"]
        print(f"| {what} | {r['setup_s']:.1f} | {r['wall_s']:.1f} | {r['maxrss_mb']:.0f} | {ratio:.1f}x |")
    print(f"| (a process that only imports rifle.run, timm, torchvision) | | | {imports:.0f} | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2500, help="JPEGs of the set-up measurement")
    ap.add_argument("--rss-gb", type=float, default=6.0, help="decoded size of the RSS measurement (GB)")
    ap.add_argument("--work", default=None, help="folder for the data, caches and runs (default: temp)")
    ap.add_argument("--skip-setup", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-off", action="store_true", help="no --cache-dir off run in the RSS part")
    ap.add_argument("--keep", action="store_true", help="keep --work")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rifle-decode-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; {os.cpu_count()} CPUs; free disk {shutil.disk_usage(work).free / 1e9:.1f} GB")
    try:
        if not args.skip_setup:
            setup_time(work, args.images)
        if not args.skip_rss:
            rss(work, args.rss_gb, not args.skip_off)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
