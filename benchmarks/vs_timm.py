"""`rifle train` against timm's `train.py`, side by side on ELPV (EfficientNet-Lite0, 112 px, batch 32).

    python benchmarks/vs_timm.py --timm-train /path/to/pytorch-image-models/train.py

timm's `train.py` is not in the timm wheel: clone https://github.com/huggingface/pytorch-image-models
and pass its `train.py` (or set ``TIMM_TRAIN_PY``); it runs with this environment's timm. Nothing is
downloaded: timm trains from random initialisation (a step costs the same as from ImageNet weights),
rifle from the offline weights of ``--preset cpu``. Both train on ELPV's training images (rifle's fixed
split without its test quarter; timm reads the package's PNG files through an image folder of links) with
SGD (momentum 0.9, lr 0.01, weight decay 1e-4, cosine), channels_last and torch's default threads; timm
with 2 loader workers and its default augmentation. The sides run in turn, ``--repeats`` times; a side's
speed is the median of its epochs after the first (warm-up) of training images per second as the tool
itself reports it (rifle: ``metrics.jsonl`` ``images_per_s``; timm: the epoch's mean update time in its
last ``Train:`` line). Writes ``docs/performance.md``'s "rifle vs timm" section and ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN vs timm: written by benchmarks/vs_timm.py -->"
END = "<!-- END vs timm -->"
# timm's last line of an epoch: "Train: 2 [  54/55 (100%)]  Loss: ... Time: 0.33s, 96.9/s  (0.34s,  93.8/s)"
N_ELPV_TRAIN = 1771  # rifle's training split of ELPV (the test quarter and a validation tenth left out)
TIMM_EPOCH = re.compile(r"Train: (\d+) \[\s*\d+/\d+ \(100%\)\].*?\(([\d.]+)s,\s*([\d.]+)/s\)")


def image_folder(out: Path, limit: int | None = None) -> tuple[Path, int]:
    """ELPV's images outside rifle's test quarter as ``train/<class>/`` links (and 64 test images as
    ``validation/``, which timm's train.py evaluates after every epoch; not timed)."""
    from rifle.data.builtin import ELPV_CLASSES, elpv_files

    paths, labels, index = elpv_files()  # rifle's fixed split: the same test quarter
    train, test = index["train"], index["test"]
    train = train[:limit]
    folder = out / ("elpv_folder" if limit is None else f"elpv_folder_{limit}")
    for split, idx in (("train", train.tolist()), ("validation", test.tolist()[:64])):
        for i in idx:
            link = folder / split / ELPV_CLASSES[int(labels[i])] / paths[i].name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(paths[i])
    return folder, len(train)


def run_timm(train_py: Path, folder: Path, out: Path, epochs: int, workers: int) -> tuple[list[float], float]:
    cmd = [sys.executable, str(train_py), "--data-dir", str(folder), "--model", "efficientnet_lite0"]
    cmd += ["--num-classes", "4", "--img-size", "112", "-b", "32", "--epochs", str(epochs), "--lr", "0.01"]
    cmd += ["--opt", "sgd", "--momentum", "0.9", "--weight-decay", "1e-4", "--sched", "cosine"]
    cmd += ["--warmup-epochs", "0", "--channels-last", "-j", str(workers), "--device", "cpu", "--seed", "0"]
    cmd += ["--log-interval", "100000", "--checkpoint-hist", "1", "--output", str(out), "--experiment", "run"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    wall = time.perf_counter() - t0
    log = p.stdout + p.stderr
    (out / "timm.log").write_text(log)
    if p.returncode:
        sys.exit(
            f"timm's train.py failed (exit {p.returncode}); its output: {out / 'timm.log'}\n{log[-2000:]}"
        )
    rates = {int(m[1]): float(m[3]) for m in TIMM_EPOCH.finditer(log)}
    if sorted(rates) != list(range(epochs)):
        sys.exit(
            f"could not read timm's per-epoch speed from {out / 'timm.log'} (epochs found: {sorted(rates)})"
        )
    return [rates[e] for e in range(epochs)], wall


def run_rifle(out: Path, epochs: int, fraction: float) -> tuple[list[float], float]:
    cmd = [sys.executable, "-m", "rifle", "train", "--preset", "cpu", "--data", "elpv", "--image-size", "112"]
    cmd += ["--batch-size", "32", "--lr", "0.01", "--epochs", str(epochs), "--out", str(out / "run")]
    cmd += ["--train-fraction", str(fraction), "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"rifle train failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in rows], wall


def render(res: dict) -> str:
    per = res["repeats"]
    lines = [
        BEGIN,
        "## rifle vs timm's `train.py` (issue 23)",
        "",
        f"Regenerate: `{res['command']}` (writes this section). {res['machine']}. timm {res['timm']} "
        f"(`train.py` sha256 {res['train_py_sha256'][:12]}), torch {res['torch']}. ELPV, EfficientNet-Lite0, "
        f"112 px, batch 32, SGD lr 0.01, cosine, channels_last, {res['epochs']} epochs per process "
        f"({res['train_images']} training images; the first epoch is warm-up and not counted); timm with "
        f"`-j {res['workers']}` and its default augmentation. The sides ran in turn; training images per "
        "second as each tool reports it, median over the counted epochs:",
        "",
        "| repeat | rifle img/s | timm img/s | rifle / timm | wall s (rifle, timm) |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(per):
        lines.append(
            f"| {i + 1} | {r['rifle']:.1f} | {r['timm']:.1f} | {r['ratio']:.3f} | "
            f"{r['rifle_wall']:.0f}, {r['timm_wall']:.0f} |"
        )
    lines += [
        "",
        f"**rifle / timm: {res['ratio']:.3f}** (median of the {len(per)} repeats' ratios; target ≥ 1.3).",
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--timm-train",
        type=Path,
        default=os.environ.get("TIMM_TRAIN_PY"),
        help="timm's train.py (from a clone of pytorch-image-models; default $TIMM_TRAIN_PY)",
    )
    ap.add_argument(
        "--epochs", type=int, default=3, help="epochs per process, the first not counted (default 3)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="times each side runs, in turn (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="timm's loader workers (default 2)")
    ap.add_argument("--limit", type=int, help="train on about this many images (a quick check of the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "vs_timm", help="work folder")
    ap.add_argument("--page", default=str(ROOT / "docs" / "performance.md"), help="page to write ('' none)")
    a = ap.parse_args(argv)
    if a.timm_train is None or not Path(a.timm_train).is_file():
        ap.error(
            f"--timm-train: no file {a.timm_train!r}: pass timm's train.py (git clone "
            "https://github.com/huggingface/pytorch-image-models) or set TIMM_TRAIN_PY"
        )
    if a.epochs < 2:
        ap.error("--epochs must be at least 2 (the first epoch is warm-up)")
    import timm
    import torch

    a.out.mkdir(parents=True, exist_ok=True)
    folder, n_train = image_folder(a.out, a.limit)
    fraction = 1.0 if a.limit is None else min(1.0, round(a.limit / N_ELPV_TRAIN, 3))
    repeats = []
    for i in range(a.repeats):
        speeds: dict[str, tuple[list[float], float]] = {}
        for side in ("timm", "rifle") if i % 2 == 0 else ("rifle", "timm"):
            out = a.out / f"{side}{i}"
            out.mkdir(exist_ok=True)
            if side == "timm":
                speeds[side] = run_timm(a.timm_train.resolve(), folder, out, a.epochs, a.workers)
            else:
                speeds[side] = run_rifle(out, a.epochs, fraction)
            print(f"repeat {i + 1}/{a.repeats} {side}: {speeds[side][0]} img/s per epoch", flush=True)
        r = {s: statistics.median(speeds[s][0][1:]) for s in speeds}
        repeats.append(
            {
                **r,
                "ratio": r["rifle"] / r["timm"],
                "rifle_wall": speeds["rifle"][1],
                "timm_wall": speeds["timm"][1],
                "per_epoch": {s: speeds[s][0] for s in speeds},
            }
        )
    res = {
        "command": "python benchmarks/vs_timm.py --timm-train PATH/train.py"
        + (f" --repeats {a.repeats}" if a.repeats != 3 else "")
        + (f" --epochs {a.epochs}" if a.epochs != 3 else "")
        + (f" --limit {a.limit}" if a.limit else ""),
        "machine": f"x86_64, {os.cpu_count()} cores",
        "timm": timm.__version__,
        "torch": torch.__version__,
        "train_py_sha256": hashlib.sha256(Path(a.timm_train).read_bytes()).hexdigest(),
        "epochs": a.epochs,
        "workers": a.workers,
        "train_images": n_train,
        "repeats": repeats,
        "ratio": statistics.median(r["ratio"] for r in repeats),
    }
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    print(text)
    if a.page:
        from rifle.experiments.markdown import update_page

        update_page(a.page, text.rstrip("\n"), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
