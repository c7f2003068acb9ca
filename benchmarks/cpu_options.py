"""When do --channels-last / --amp help on this machine? Ratios of one training step, in one process.

Both sides of each ratio run alternately (median of ``--repeats``) on the same model and batch:
EfficientNet-Lite0 at 112 px, batch 32, SGD step. Writes docs/performance-options.md.
``--compile`` is not measured here (compiling takes minutes on 2 cores and only pays off on long runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rifle.models import create_model


def make_step(channels_last: bool, amp: bool):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 4)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 112, 112)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (32,))

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--out", default="docs/performance-options.md")
    args = p.parse_args()
    variants = {
        "contiguous fp32": make_step(False, False),
        "channels_last fp32 (default)": make_step(True, False),
        "channels_last bf16 autocast": make_step(True, True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f(), f()  # warm-up
    for _ in range(args.repeats):
        for k, f in variants.items():
            times[k].append(f())
    base = times["channels_last fp32 (default)"]
    lines = [
        "# CPU options: channels_last and bf16 autocast",
        "",
        f"Regenerate: `python benchmarks/cpu_options.py` (also run by `make bench-speed`). "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"EfficientNet-Lite0 training step at 112 px, batch 32; median of {args.repeats} alternating "
        f"repeats. A ratio > 1 is slower than the default.",
        "",
        "| variant | ms / step | img/s | time ÷ default |",
        "|---|---|---|---|",
    ]
    for k, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(a / b for a, b in zip(ts, base))
        lines.append(f"| {k} | {1000 * med:.0f} | {32 / med:.1f} | {ratio:.2f} |")
    lines += [
        "",
        "* `channels_last` is the default (`--no-channels-last` turns it off).",
        "* `--amp bf16` only helps on CPUs with native bf16 matrix units (AMX / AVX512-BF16) and on "
        "GPUs; `--amp fp16` is for CUDA GPUs (with a GradScaler). Both are off by default.",
        "* `--compile` (torch.compile) costs minutes of compilation on a 2-core CPU; consider it for "
        "long GPU runs. Off by default, so none of these can slow the CPU default.",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
