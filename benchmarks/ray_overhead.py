"""What ``rifle bench --engine ray`` costs over the local engine on one machine (issue 13).

1. Ray itself, in this process: the start of a local cluster (``ray.init(num_cpus=2)``), the round trip
   of an empty task on a warm worker (submit + get, one at a time), and the first task of a fresh job
   that imports what a run needs (``rifle.run``: torch, timm, ...), i.e. a worker's cold start.
2. The wall time of one small grid (``GRID`` below: 8 short runs), each side a ``rifle bench`` process
   from its start to its exit, in turn, ``--repeats`` times, medians:
   local  = ``--workers 2`` (2 worker processes, 1 torch thread each);
   ray    = ``--engine ray --cpus-per-run 1`` joining the cluster of (1) (2 runs at once, 1 thread each);
   ray+start = ``--engine ray`` starting its own one-machine cluster (what a laptop user runs).
   Per-run overhead = (ray - local) x 2 slots / runs.

Usage: ``python benchmarks/ray_overhead.py [--repeats 3] [--out docs/performance.md]`` (``--out``
rewrites the section between this benchmark's markers, or appends it; ``-`` prints only).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GRID = {
    "datasets": ["digits"],
    "models": ["tiny_cnn"],
    "methods": [{"name": "finetune"}, {"name": "rifle", "reinits": 1}],
    "seeds": [0, 1, 2, 3],
    "train_fractions": [0.5],
    "train": {"epochs": 4, "image_size": 32, "batch_size": 32, "lr": 0.05, "min_steps_after": 0},
}
BEGIN = "<!-- BEGIN ray overhead: written by benchmarks/ray_overhead.py -->"
END = "<!-- END ray overhead -->"


def _noop():
    return os.getpid()


def _import_run():
    t0 = time.perf_counter()
    import rifle.run  # noqa: F401 - what every run imports first

    return time.perf_counter() - t0


def ray_itself(temp: str) -> dict[str, float]:
    import ray

    t0 = time.perf_counter()
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False, logging_level="WARNING"
    )
    start = time.perf_counter() - t0
    noop = ray.remote(num_cpus=1)(_noop)
    t0 = time.perf_counter()
    ray.get(noop.remote())
    first = time.perf_counter() - t0  # a worker process started for this job
    trips = []
    for _ in range(100):
        t0 = time.perf_counter()
        ray.get(noop.remote())
        trips.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    imp = ray.get(ray.remote(num_cpus=1)(_import_run).remote())
    imp_wall = time.perf_counter() - t0
    return {
        "start": start,
        "first_task": first,
        "round_trip_ms": 1000 * statistics.median(trips),
        "import_run": imp,
        "import_run_wall": imp_wall,
        "address": ray.get_runtime_context().gcs_address,
    }


def bench(args: list[str], grid: Path, out: Path, env: dict[str, str]) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rifle", "bench", str(grid), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or f"{n_runs()}/{n_runs()} runs complete" not in proc.stdout:
        raise RuntimeError(f"rifle bench {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout


def n_runs() -> int:
    return len(GRID["seeds"]) * len(GRID["methods"])


def run_seconds(out: Path) -> float:
    import json

    return sum(json.loads(p.read_text())["wall_seconds"] for p in out.rglob("summary.json"))


def write_section(path: Path, text: str) -> None:
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", lambda m: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def render(r: dict, walls: dict[str, list[float]], repeats: int, machine: str, note: str = "") -> str:
    """The markdown section: ``r`` from :func:`ray_itself`, ``walls`` = side -> wall times (s) per repeat."""
    med = {k: statistics.median(v) for k, v in walls.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(walls[k], walls["local"])) for k in walls}
    per_run = (med["ray"] - med["local"]) * 2 / n_runs()
    t = GRID["train"]
    lines = [
        "## Ray engine overhead (`rifle bench --engine ray`, one machine)",
        "",
        f"Regenerate: `python benchmarks/ray_overhead.py` (writes this section). Machine: {machine}."
        + (f" {note}" if note else ""),
        "",
        "| Ray itself (this process, local 2-CPU cluster) | seconds |",
        "|---|---|",
        f"| cluster start (`ray.init(num_cpus=2)`) | {r['start']:.1f} |",
        f"| first task of a job (a worker process starts) | {r['first_task']:.2f} |",
        f"| empty task round trip on a warm worker (median of 100) | {r['round_trip_ms'] / 1000:.4f} |",
        f"| a worker's first `import rifle.run` (torch, timm, ...), inside a task | {r['import_run']:.1f} |",
        "",
        f"Small grid: {n_runs()} runs (tiny_cnn on digits, {t['image_size']} px, {t['epochs']} epochs, "
        f"train fraction 0.5; 2 methods x 4 seeds), each side a whole `rifle bench` process (start to exit), "
        f"2 runs at a time with 1 torch thread each, the three sides in turn, median of {repeats} "
        f"(ratio: median of the per-repeat ratios):",
        "",
        "| side | wall time (s) | ratio to local | per repeat (s) |",
        "|---|---|---|---|",
        *(
            f"| {label} | {med[k]:.1f} | {ratio[k]:.2f} | {', '.join(f'{w:.0f}' for w in walls[k])} |"
            for k, label in (
                ("local", "local engine, `--workers 2`"),
                ("ray", "`--engine ray --address` (cluster already running)"),
                ("ray+start", "`--engine ray` starting its own cluster"),
            )
        ),
        "",
        f"Ray's cost per run on a running cluster, (ray − local) × 2 slots / {n_runs()} runs: "
        f"{per_run:+.1f} s; "
        f"its fixed costs are the cluster start (when `rifle bench` starts one) and, per worker process, the "
        f"import of torch and rifle (paid by the local engine's worker processes too), then "
        f"{r['round_trip_ms']:.1f} ms of scheduling per run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="docs/performance.md")
    p.add_argument("--note", default="", help="a sentence on the machine's state (e.g. another job running)")
    args = p.parse_args(argv)
    import ray
    import torch

    temp = tempfile.mkdtemp(prefix="rifle-ray-", dir="/tmp")
    work = Path(tempfile.mkdtemp(prefix="rifle-ray-bench-"))
    try:
        r = ray_itself(temp)
        print({k: v for k, v in r.items() if k != "address"}, flush=True)
        grid = work / "grid.yaml"
        grid.write_text(yaml.safe_dump(GRID))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.setdefault("RIFLE_CACHE_DIR", str(work / "cache"))
        sides = {
            "local": ["--workers", "2"],
            "ray": ["--engine", "ray", "--address", r["address"], "--cpus-per-run", "1"],
            "ray+start": ["--engine", "ray", "--cpus-per-run", "1"],
        }
        bench(sides["local"], grid, work / "warm", env)  # the data cache and the page cache, once
        walls: dict[str, list[float]] = {k: [] for k in sides}
        runs: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, extra in sides.items():
                wall, _ = bench(extra, grid, work / name, env)
                walls[name].append(wall)
                runs[name].append(run_seconds(work / name))
                print(
                    f"{name:10s} {wall:6.1f} s  (sum of the runs' own wall_seconds {runs[name][-1]:.1f} s)",
                    flush=True,
                )
        ray.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    text = render(
        r,
        walls,
        args.repeats,
        f"{os.cpu_count()} cores, ray {ray.__version__}, torch {torch.__version__}",
        args.note,
    )
    print(text)
    if args.out != "-":
        write_section(Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
