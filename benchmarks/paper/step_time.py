"""ResNet-50 / 224 px training-step and evaluation time of the ``--preset paper`` recipe on this machine.

The worst-case input for docs/reproduce.md's cost formula (a GPU gives ``make gpu-check``'s number
instead). torchvision ResNet-50 without weights (nothing is downloaded), a 200-class head, SGD momentum
0.9, batch 32, channels_last (rifle's default), random 224x224 inputs already in memory: the compute
bound, without data loading or augmentation. Prints img/s (median of the timed steps).

On a GPU (``--device cuda``) it gives the same recipe's batch-32 rate, to put into the formula instead
of ``make gpu-check``'s batch-128 number.

Usage: ``python benchmarks/paper/step_time.py [--device cpu|cuda] [--steps 4] [--warmup 1] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=4, help="timed training steps (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = p.parse_args(argv)

    import torch
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=args.classes)
    dev = torch.device(args.device)
    model = model.to(dev, memory_format=torch.channels_last)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    x = x.to(dev, memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch_size,), device=dev)
    model.train()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        print(f"train step {i}{' (warm-up)' if i < args.warmup else ''}: {dt:.2f} s", flush=True)
    model.eval()
    xe = torch.randn(args.eval_batch_size, 3, args.image_size, args.image_size)
    xe = xe.to(dev, memory_format=torch.channels_last)
    etimes = []
    with torch.inference_mode():
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            model(xe)
            sync()
            etimes.append(time.perf_counter() - t0)
    step = statistics.median(times)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"ResNet-50 {args.image_size} px batch {args.batch_size}: training step {step:.2f} s "
        f"(median of {len(times)}: {', '.join(f'{t:.2f}' for t in times)}) = "
        f"{args.batch_size / step:.2f} img/s; evaluation (batch {args.eval_batch_size}, inference mode) "
        f"{args.eval_batch_size / etimes[-1]:.2f} img/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
