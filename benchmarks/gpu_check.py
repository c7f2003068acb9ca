"""GPU check: does ``rifle`` train correctly and fast on this CUDA machine? (``make gpu-check``)

Run it on a machine with an NVIDIA GPU; CI never runs it. Nothing is downloaded: the functional runs
use scikit-learn's digits and timm's resnet18 with ``pretrained=False``; the throughput measurement
uses timm's resnet50 (``pretrained=False``) on synthetic uint8 images held in memory.

1. Functional checks, each a real ``rifle train`` child process (RIFLE, K=1, so a re-init happens on the
   GPU): AMP bf16, AMP fp16 (GradScaler), fp32 channels_last, fp32 contiguous, ``--compile`` (bf16) and,
   when 2 GPUs exist, 2-process DDP with nccl through torchrun (replica checksums compared). A check
   passes when the run completes, every loss is finite, the training loss falls and the test accuracy is
   above 3x chance.
2. Throughput at ResNet-50 / 224 px, batch 128 (``--quick``: resnet18 / 32 px): the ``rifle`` trainer
   (evaluation excluded) against a minimal hand-written loop over the same cached data, augmentation,
   memory format and precision (as ``benchmarks/speed.py`` does on CPU), and the compute bound (the
   same loop on one batch already on the GPU), for fp32, channels_last, bf16, fp16 and bf16 +
   torch.compile. Wall times are taken between ``torch.cuda.synchronize()`` calls; the median of
   ``--repeats`` epochs after one warm-up epoch.

Exit status: 0 = every check that ran passed; 1 = a check failed (see the table and the logs in
``--out``); 77 = no CUDA device, nothing was checked (the autotools "skipped" code; ``--device cpu``
runs the same checks on the CPU, to test this script itself).

Usage: ``python benchmarks/gpu_check.py [--quick] [--skip compile,ddp,...] [--out runs/gpu_check]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

SKIPPED = 77
CHECKS = ("bf16", "fp16", "channels_last", "contiguous", "compile", "ddp", "throughput")


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ functional
def functional_argv(args: argparse.Namespace, out: Path) -> list[str]:
    model = (
        ["--model", "tiny_cnn", "--image-size", "16"]
        if args.quick
        else ["--model", "resnet18", "--no-pretrained", "--image-size", "32"]
    )
    return [
        "train",
        "--data",
        "digits",
        *model,
        "--epochs",
        "5",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--method",
        "rifle",
        "--reinits",
        "1",
        "--min-steps-after",
        "0",
        "--device",
        args.device,
        "--log-to",
        "jsonl",
        "--out",
        str(out),
        "--overwrite",
    ]


def run_functional(name: str, extra: list[str], args: argparse.Namespace, ddp: bool = False) -> dict:
    out = Path(args.out) / name
    argv = functional_argv(args, out) + extra
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        if ddp
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "rifle", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.log").write_text(f"$ {' '.join(cmd)}\n\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    res = {"check": name, "seconds": round(seconds, 1), "command": " ".join(cmd)}
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    rows = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").is_file()
        else []
    )
    if not summary.get("complete"):
        problems.append("run not complete")
    losses = [r.get("train_loss") for r in rows]
    if rows and not all(isinstance(v, float) and math.isfinite(v) for v in losses):
        problems.append(f"non-finite training loss: {losses}")
    elif len(rows) >= 2 and not losses[-1] < losses[0]:
        problems.append(f"training loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    acc = summary.get("final_test_acc")
    n_classes = len(summary.get("classes") or []) or 10
    if acc is not None and not acc > 3 / n_classes:
        problems.append(f"test accuracy {acc:.3f} not above 3x chance ({3 / n_classes:.2f})")
    if summary.get("reinit_epochs") and not any(r.get("reinit") for r in rows):
        problems.append("no re-init happened")
    if ddp and summary:
        d = summary.get("ddp") or {}
        want = "nccl" if args.device.startswith("cuda") else "gloo"
        if d.get("world_size") != 2 or d.get("backend") != want:
            problems.append(f"expected 2 ranks with {want}, got {d}")
        sums = d.get("replica_checksums") or []  # one checksum list per rank, gathered at the end
        if len(sums) != 2 or sums[0] != sums[1]:
            problems.append(f"replica checksums missing or different: {sums}")
    res.update(
        ok=not problems,
        problems=problems,
        final_test_acc=acc,
        train_loss=[round(v, 4) for v in losses if isinstance(v, float)],
        images_per_s=rows[-1].get("images_per_s") if rows else None,
    )
    return res


# ------------------------------------------------------------------------------------------ throughput
def synthetic_data(n: int, resolution: int, classes: int):
    import torch
    from rifle.data import DataBundle
    from rifle.data.cache import ImageTensorSet

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return DataBundle(
        train=ImageTensorSet(images, labels),
        val=ImageTensorSet(images[:0], labels[:0]),
        test=ImageTensorSet(images[:8], labels[:8]),
        classes=[str(c) for c in range(classes)],
    )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(name: str, classes: int, device, channels_last: bool):
    import torch
    from rifle.models import create_model

    torch.manual_seed(0)
    model = create_model(name, classes, pretrained=False).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def trainer_epoch(trainer, epoch: int) -> float:
    """Wall seconds of one training epoch of the rifle trainer (evaluation stubbed out)."""
    _sync(trainer.device)
    t0 = time.perf_counter()
    trainer.train_epoch(epoch)
    _sync(trainer.device)
    return time.perf_counter() - t0


def make_trainer(args, data, setting: dict, tmp: str):
    import torch
    from rifle.config import TrainConfig
    from rifle.models import model_preprocessing
    from rifle.build import build_methods
    from rifle.train import RunDir, Trainer

    model = new_model(args.model, data.num_classes, torch.device(args.device), setting["channels_last"])
    t = Trainer(
        model,
        data,
        build_methods(TrainConfig(method="finetune")),
        epochs=1000,
        batch_size=args.batch_size,
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        lr_schedule="constant",
        image_size=args.image_size,
        seed=0,
        preprocessing=model_preprocessing(model),
        run_dir=RunDir(tempfile.mkdtemp(dir=tmp)),
        device=torch.device(args.device),
        channels_last=setting["channels_last"],
        amp=setting["amp"],
        compile=setting["compile"],
        workers=args.workers,
        log=lambda s: None,
        progress=False,
    )
    t.evaluate = lambda ds: {"acc": 0.0, "loss": 0.0, "n": 0}  # time training only
    return t


class MinimalLoop:
    """What one writes by hand: the same batches, model, optimizer and precision; nothing else."""

    def __init__(self, args, data, setting: dict) -> None:
        import torch
        from rifle.models import model_preprocessing

        self.args, self.data, self.s = args, data, setting
        self.device = torch.device(args.device)
        self.model = new_model(args.model, data.num_classes, self.device, setting["channels_last"])
        self.prep = model_preprocessing(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=setting["amp"] == "fp16")
        self.forward = torch.compile(self.model) if setting["compile"] else self.model
        self.dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting["amp"]]

    def _step(self, x, y) -> None:
        import torch
        import torch.nn.functional as F

        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.forward(x).float(), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def batches(self, epoch: int):
        from rifle.data import train_batches

        return train_batches(
            self.data.train,
            self.args.batch_size,
            self.args.image_size,
            self.prep["mean"],
            self.prep["std"],
            seed=0,
            epoch=epoch,
            drop_last=True,
            channels_last=self.s["channels_last"],
        )

    def epoch(self, epoch: int, prebuilt: bool = False) -> float:
        self.model.train()
        if prebuilt:  # the compute bound: one batch already on the device, no data work at all
            x, y = next(iter(self.batches(epoch)))
            x, y = x.to(self.device), y.to(self.device)
            steps = len(self.data.train) // self.args.batch_size
            it = ((x, y) for _ in range(steps))
        else:
            it = (
                (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                for x, y in self.batches(epoch)
            )
        _sync(self.device)
        t0 = time.perf_counter()
        for x, y in it:
            self._step(x, y)
        _sync(self.device)
        return time.perf_counter() - t0


SETTINGS = [
    ("fp32, contiguous", dict(amp="none", channels_last=False, compile=False)),
    ("fp32, channels_last", dict(amp="none", channels_last=True, compile=False)),
    ("bf16, channels_last", dict(amp="bf16", channels_last=True, compile=False)),
    ("fp16, channels_last", dict(amp="fp16", channels_last=True, compile=False)),
    ("bf16, channels_last, compile", dict(amp="bf16", channels_last=True, compile=True)),
]


def throughput(args: argparse.Namespace, skip: set[str]) -> list[dict]:
    import torch

    data = synthetic_data(args.images, round(args.image_size * 8 / 7), 100)
    n = len(data.train)  # a multiple of the batch size: both sides train on every image
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, s in SETTINGS:
            if (s["amp"] in skip) or (s["compile"] and "compile" in skip):
                continue
            if s["amp"] == "bf16" and args.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
                rows.append({"setting": label, "note": "bf16 not supported on this GPU"})
                continue
            log(f"throughput: {label} ...")
            try:
                trainer, minimal = make_trainer(args, data, s, tmp), MinimalLoop(args, data, s)
                for m in trainer.methods:
                    m.setup(trainer.model, trainer.optimizer, trainer.ctx)
                trainer_epoch(trainer, 0), minimal.epoch(0), minimal.epoch(0, prebuilt=True)  # warm-up
                tt, mt, bt = [], [], []
                for r in range(1, args.repeats + 1):
                    tt.append(trainer_epoch(trainer, r))
                    mt.append(minimal.epoch(r))
                    bt.append(minimal.epoch(r, prebuilt=True))
                t, m, b = statistics.median(tt), statistics.median(mt), statistics.median(bt)
                rows.append(
                    {
                        "setting": label,
                        "trainer_img_s": n / t,
                        "minimal_img_s": n / m,
                        "bound_img_s": n / b,
                        "trainer_over_minimal": m / t,
                        "minimal_over_bound": b / m,
                    }
                )
            except Exception as e:  # noqa: BLE001 - report and continue with the other settings
                rows.append({"setting": label, "error": f"{type(e).__name__}: {e}"})
            finally:
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ main
def machine(args) -> str:
    import torch

    if args.device.startswith("cuda"):
        i = torch.device(args.device).index or 0
        p = torch.cuda.get_device_properties(i)
        gpu = (
            f"{torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB, "
            f"compute {p.major}.{p.minor}), CUDA {torch.version.cuda}"
        )
    else:
        gpu = f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", default="cuda", help="cuda, cuda:N, or cpu (to test this script) (default cuda)"
    )
    p.add_argument(
        "--out",
        default="runs/gpu_check",
        help="folder for the runs, logs and results.json (default runs/gpu_check)",
    )
    p.add_argument(
        "--skip", default="", help=f"comma-separated checks to leave out: {', '.join(CHECKS)} (default none)"
    )
    p.add_argument("--quick", action="store_true", help="tiny models and sizes: a smoke test of the script")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per side, median (default 3)")
    p.add_argument(
        "--workers", type=int, default=0, help="the trainer's --workers (default 0, as the minimal loop)"
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per functional run (default 1800)")
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(CHECKS)
    if unknown:
        p.error(
            f"--skip {args.skip}: unknown check(s) {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(CHECKS)}"
        )
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False), so nothing was checked. "
            f"Run it on a machine with an NVIDIA GPU (make gpu-check), or pass --device cpu to test the "
            f"script itself. Exit status {SKIPPED} = skipped."
        )
        return SKIPPED
    warnings.simplefilter("ignore")
    if args.quick:
        args.model, args.image_size, args.batch_size, args.images = "resnet18", 32, 16, 64
    else:
        args.model, args.image_size, args.batch_size, args.images = "resnet50", 224, 128, 2048
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"gpu_check on {machine(args)}")
    results: dict = {"machine": machine(args), "functional": [], "throughput": []}
    functional = [
        ("bf16", ["--amp", "bf16"]),
        ("fp16", ["--amp", "fp16"]),
        ("channels_last", ["--channels-last"]),
        ("contiguous", ["--no-channels-last"]),
        ("compile", ["--compile", "--amp", "bf16"]),
    ]
    for name, extra in functional:
        if name in skip:
            continue
        if name == "bf16" and args.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            results["functional"].append({"check": name, "ok": None, "problems": ["bf16 not supported"]})
            continue
        log(f"check {name}: rifle train {' '.join(extra)} ...")
        results["functional"].append(run_functional(name, extra, args))
    if "ddp" not in skip:
        n_gpu = torch.cuda.device_count() if args.device.startswith("cuda") else 2
        if n_gpu >= 2:
            log("check ddp: torchrun --nproc_per_node=2 rifle train ...")
            results["functional"].append(run_functional("ddp", [], args, ddp=True))
        else:
            results["functional"].append(
                {"check": "ddp", "ok": None, "problems": [f"needs 2 GPUs, found {n_gpu}: not run"]}
            )
    if "throughput" not in skip:
        results["throughput"] = throughput(args, skip)

    lines = [
        f"# gpu_check: {results['machine']}",
        "",
        "| check | result | s | test acc | train loss first -> last | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["functional"]:
        status = {True: "pass", False: "FAIL", None: "not run"}[r["ok"]]
        losses = r.get("train_loss") or []
        acc = r.get("final_test_acc")
        lines.append(
            f"| {r['check']} | {status} | {r.get('seconds', '')} | "
            f"{'' if acc is None else f'{acc:.3f}'} | "
            f"{f'{losses[0]:.3f} -> {losses[-1]:.3f}' if losses else ''} | {'; '.join(r['problems'])} |"
        )
    if results["throughput"]:
        lines += [
            "",
            f"Throughput, {args.model} at {args.image_size} px, batch {args.batch_size}, "
            f"{args.images} synthetic images, trainer --workers {args.workers}, median of {args.repeats} "
            f"epochs (img/s):",
            "",
            "| setting | trainer | minimal loop | compute bound | trainer / minimal | minimal / bound |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["throughput"]:
            if "trainer_img_s" in r:
                lines.append(
                    f"| {r['setting']} | {r['trainer_img_s']:.0f} | {r['minimal_img_s']:.0f} | "
                    f"{r['bound_img_s']:.0f} | {r['trainer_over_minimal']:.3f} | "
                    f"{r['minimal_over_bound']:.3f} |"
                )
            else:
                lines.append(f"| {r['setting']} | {r.get('error') or r.get('note')} | | | | |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log("\n" + text)
    failed = [r["check"] for r in results["functional"] if r["ok"] is False] + [
        r["setting"] for r in results["throughput"] if "error" in r
    ]
    log(
        f"{'FAILED: ' + ', '.join(failed) if failed else 'all checks that ran passed'}; "
        f"results in {out / 'results.md'} and results.json, logs in {out}/<check>/check.log"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
