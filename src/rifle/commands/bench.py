"""``rifle bench``: run a grid of paired runs (resumable, shareable by several workers, or on a Ray
cluster with ``--engine ray``)."""

from __future__ import annotations

import argparse
import sys

NAME = "bench"
HELP = "run a grid of runs (datasets x models x fractions x methods x seeds); resumable"
EXAMPLE = "rifle bench benchmarks/elpv_grid.yaml --out runs/elpv_grid    # re-run the same command to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", metavar="GRID.yaml", help="grid file (see docs/experiments.md)")
    p.add_argument(
        "--out", required=True, help="grid folder; runs go to OUT/<data>/<model>/frac<f>/<label>/seed<s>"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the grid (torch threads = cores // workers each)",
    )
    p.add_argument(
        "--stale-after",
        type=float,
        default=600.0,
        help="seconds without a heartbeat after which another worker may take a run over "
        "(default 600; a lock whose pid is dead on this host is stale at once)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in this process (--engine ray: in each run; default --cpus-per-run)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="folder of the decode cache for every run of the grid (sets RIFLE_CACHE_DIR for this process "
        "and its workers; with --engine ray, set RIFLE_CACHE_DIR on the nodes instead); 'off' decodes "
        "into memory in every run (default $RIFLE_CACHE_DIR, else ~/.cache/rifle; docs/data.md#decode-cache)",
    )
    p.add_argument(
        "--seeds",
        metavar="S,S,...",
        default=None,
        help="run only these of the grid's seeds (comma-separated, e.g. 0 or 0,1); the other seeds' runs "
        "are left as they are, and a later command without --seeds runs them (default: every seed)",
    )
    p.add_argument("--list", action="store_true", help="list the runs and their status, run nothing")
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train again, from scratch, the runs whose folder holds a config that differs from the "
        "grid's (their old results are deleted); without it such a grid is refused, naming "
        "the changed keys",
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: worker processes on this machine (default); ray: one Ray task per run, on "
        "a Ray cluster (needs the [ray] extra; see docs/experiments.md, 'On a cluster')",
    )
    ray = p.add_argument_group("--engine ray")
    ray.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: 'auto' (started with `ray start` on this machine) or HOST:PORT "
        "of its head; default: RAY_ADDRESS, else a `ray start` cluster on this machine, else "
        "a new one-machine cluster",
    )
    ray.add_argument(
        "--cpus-per-run",
        type=float,
        default=None,
        help="CPUs each run reserves, and its torch threads (default 1)",
    )
    ray.add_argument(
        "--gpus-per-run",
        type=float,
        default=None,
        help="GPUs each run reserves; fractions share a GPU (default 0: runs train on the CPU)",
    )
    ray.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="times a run is started again when its worker process or node dies (default 3); "
        "a run that raises is recorded in error.txt and not retried",
    )
    # internal: set by --workers N for its subprocesses
    p.add_argument("--since", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-name", default="", help=argparse.SUPPRESS)
    p.add_argument("--no-grid-copy", action="store_true", help=argparse.SUPPRESS)


def _say_line(text: str) -> None:
    """One write per line: workers sharing a terminal or pipe never merge two lines into one."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from ..experiments.grid import (
        changed_error,
        changed_runs,
        expand,
        load_grid,
        only_seeds,
        write_grid_copy,
    )
    from ..experiments.locks import run_status
    from ..experiments.runner import launch_workers, run_grid, seconds_text

    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be >= 1")
    ray_flags = {
        "--address": args.address,
        "--cpus-per-run": args.cpus_per_run,
        "--gpus-per-run": args.gpus_per_run,
        "--max-retries": args.max_retries,
    }
    if args.engine == "local":
        given = [k for k, v in ray_flags.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --engine ray")
    elif args.workers != 1:
        raise ValueError(
            f"--workers {args.workers}: only with --engine local; with --engine ray the "
            f"cluster's CPUs / --cpus-per-run runs train at once"
        )
    if args.cache_dir is not None:
        import os

        os.environ["RIFLE_CACHE_DIR"] = args.cache_dir  # read where the data is loaded, workers inherit it
    grid = load_grid(args.grid)
    extra_args = ["--rerun-changed"] if args.rerun_changed else []
    if args.seeds is not None:
        grid = only_seeds(grid, args.seeds)
        extra_args += ["--seeds", args.seeds]
    runs = expand(grid, args.out)  # validates every run before anything starts
    changed = changed_runs(runs)  # a changed grid must not silently keep the old results
    if args.list:
        differ = {id(r) for r, _ in changed}
        for spec in runs:
            print(f"{'changed' if id(spec) in differ else run_status(spec.path):8s} {spec.rel}")
        from collections import Counter

        per = Counter(f"frac{s.fraction:g}" for s in runs)
        print(
            f"{len(runs)} runs ({', '.join(f'{k}: {v}' for k, v in per.items())}) = {len(grid.seeds)} "
            f"seeds x {len(grid.datasets)} datasets x {len(grid.models)} models x methods per fraction; "
            f"baseline: {grid.baseline}"
        )
        if changed:
            print(
                f"{len(changed)} run(s) were trained with a config that differs from the grid's (rifle bench "
                f"refuses them; --rerun-changed trains them again)"
            )
        return 0
    if changed and not args.rerun_changed:
        raise changed_error(changed, args.out)
    if args.engine == "ray":
        from ..experiments.ray_engine import require_ray

        require_ray()  # before writing anything: says how to install it
    if not args.no_grid_copy:
        write_grid_copy(grid, args.out, log=lambda line: print(line, flush=True))
    if args.engine == "ray":
        return _run_ray(args, runs)
    if args.workers > 1:
        print(f"{len(runs)} runs, {args.workers} workers", flush=True)
        code = launch_workers(
            args.grid,
            args.out,
            args.workers,
            stale_after=args.stale_after,
            extra_args=extra_args,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        if code in (130, 143):
            print(
                f"{'stopped by SIGTERM' if code == 143 else 'interrupted (Ctrl-C)'}: every worker kept its "
                f"run's last epoch checkpoint; re-run the same command to continue",
                file=sys.stderr,
            )
        _final(runs, args.out)
        return code
    import time

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import contextlib

    from ..experiments.runner import first_signal_only

    t0 = time.perf_counter()
    try:
        with first_signal_only() if args.worker_name else contextlib.nullcontext():
            res = run_grid(
                runs,
                stale_after=args.stale_after,
                since=args.since,
                worker=args.worker_name,
                rerun_changed=args.rerun_changed,
                log=_say_line,
            )
    except KeyboardInterrupt as e:
        return _interrupted(
            e, "finished runs are kept, the interrupted run resumes from its last epoch", args.worker_name
        )
    c = res.counts
    tag = f"[{args.worker_name}] " if args.worker_name else ""
    print(
        f"{tag}grid pass finished in {seconds_text(time.perf_counter() - t0)}: {c['done']} done, "
        f"{c['skipped']} skipped, {c['busy']} busy (other workers), {c['failed']} failed; "
        f"data loaded {res.data_loads}x",
        flush=True,
    )
    if not args.worker_name:
        _final(runs, args.out)
    return 1 if res.failed else 0


def _run_ray(args: argparse.Namespace, runs) -> int:
    import time

    from ..experiments.ray_engine import run_grid_ray
    from ..experiments.runner import seconds_text

    t0 = time.perf_counter()
    try:
        res = run_grid_ray(
            runs,
            address=args.address,
            cpus_per_run=1.0 if args.cpus_per_run is None else args.cpus_per_run,
            gpus_per_run=args.gpus_per_run or 0.0,
            max_retries=3 if args.max_retries is None else args.max_retries,
            threads=args.threads,
            stale_after=args.stale_after,
            since=args.since,
            rerun_changed=args.rerun_changed,
        )
    except KeyboardInterrupt as e:
        return _interrupted(
            e,
            "the submitted runs were cancelled; finished runs are kept, interrupted ones "
            "resume from their last epoch",
        )
    c = res.counts
    print(
        f"grid pass (ray) finished in {seconds_text(time.perf_counter() - t0)}: {c['done']} done, "
        f"{c['skipped']} skipped, {c['failed']} failed",
        flush=True,
    )
    _final(runs, args.out)
    return 1 if res.failed else 0


def _interrupted(e: KeyboardInterrupt, kept: str, worker: str = "") -> int:
    """Say what an interrupted grid keeps; the exit status of ``rifle train``: 143 SIGTERM, 130 Ctrl-C."""
    from ..train.checkpoint import Terminated

    what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
    tag = f"[{worker}] " if worker else ""
    print(f"\n{tag}{what}: {kept}; re-run the same command to continue", file=sys.stderr, flush=True)
    return 143 if isinstance(e, Terminated) else 130


def _final(runs, out) -> None:
    from ..experiments.locks import run_status
    from collections import Counter

    states = Counter(run_status(s.path) for s in runs)
    print(
        f"grid {out}: {states['done']}/{len(runs)} runs complete"
        + (f", {states['failed']} failed (see error.txt)" if states["failed"] else "")
        + (f", {states['partial'] + states['todo']} unfinished" if states["partial"] + states["todo"] else "")
        + f"; next: rifle report {out}",
        flush=True,
    )
