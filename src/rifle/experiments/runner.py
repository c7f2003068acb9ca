"""Running a grid's runs: :func:`run_one` skips, claims (:mod:`.locks`) and trains or resumes one run,
the per-run step of both engines; :func:`run_grid` is the local engine (one process, runs in order,
data loaded once per (dataset, seed, fraction)); :func:`launch_workers` starts several such processes.
See docs/experiments.md, "Resume, Ctrl-C, failures".
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import traceback
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import format_diff
from .grid import RunSpec, config_changes
from .locks import ERROR, LOCK, is_complete, read_lock, try_claim

TRAIN_LOG = "train.log"


class DataCache:
    """The last few data bundles, keyed by everything :func:`rifle.build.load_data` reads."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0

    def get(self, spec: RunSpec):
        from ..build import load_data

        key = spec.data_key()
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        data = load_data(spec.cfg)
        self.loads += 1
        self.items[key] = data
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return data


def _file_log(path: Path) -> Callable[[str], None]:
    def log(line: str) -> None:
        with open(path / TRAIN_LOG, "a") as f:
            f.write(line.rstrip("\n") + "\n")

    return log


@dataclass
class GridResult:
    counts: Counter = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    data_loads: int = 0


@dataclass
class Outcome:
    """What :func:`run_one` did with one run: ``status`` is done | skipped | busy | failed."""

    status: str
    note: str = ""
    seconds: float = 0.0
    summary: dict[str, Any] | None = None
    resumed: bool = False
    host: str = ""
    pid: int = 0


def run_one(
    spec: RunSpec,
    cache: DataCache,
    *,
    stale_after: float = 600.0,
    heartbeat: float = 30.0,
    since: float | None = None,
    owner: str | None = None,
    rerun_changed: bool = False,
    log: Callable[[str], None] = print,
    prefix: str = "",
) -> Outcome:
    """Skip, claim and train (or resume) one run; the per-run step of both engines.

    A run that raises is written to ``error.txt`` and returned as ``failed``; ``KeyboardInterrupt``
    goes through (the lock is released, the last epoch checkpoint kept). ``since``: an ``error.txt``
    at least that recent failed in this invocation and is not retried. ``rerun_changed``: a run whose
    folder holds a config that differs from ``spec``'s is started again from scratch (its files deleted).
    """
    from ..run import run_train

    me: dict[str, Any] = dict(host=socket.gethostname(), pid=os.getpid())
    if is_complete(spec.path) and not (rerun_changed and config_changes(spec)):
        return Outcome("skipped", "  (complete)", **me)
    err = spec.path / ERROR
    if since is not None and err.is_file() and err.stat().st_mtime >= since:
        return Outcome("skipped", "  (failed earlier in this invocation, see error.txt)", **me)
    claim = try_claim(spec.path, stale_after, owner=owner)
    if claim is None:
        info = read_lock(spec.path / LOCK) or {}
        return Outcome("busy", f"  (claimed by {info.get('host')}:{info.get('pid')})", **me)
    try:
        changed = config_changes(spec) if rerun_changed else {}  # again: another worker may have re-run it
        if is_complete(spec.path) and not changed:  # finished by another worker just before we claimed it
            return Outcome("skipped", "  (complete)", **me)
        if changed:
            _clear_run(spec.path)
            log(
                f"{prefix}{spec.rel}: its config differed from the grid's ({format_diff(changed)}); "
                f"its old results are deleted, training it again"
            )
        claim.start_heartbeat(heartbeat)
        t0 = time.perf_counter()
        resuming = (spec.path / "state.pt").is_file()
        try:
            data = cache.get(spec)
            summary = run_train(spec.cfg, resume=True, data=data, log=_file_log(spec.path), progress=False)
            if not summary.get("complete"):
                raise RuntimeError(f"run ended after {summary.get('epochs_run')} of {spec.cfg.epochs} epochs")
        except KeyboardInterrupt:
            log(
                f"{prefix}interrupted during {spec.rel}; its last epoch checkpoint is kept, "
                f"re-run the same command to resume"
            )
            raise
        except Exception as e:  # noqa: BLE001 - record any failure and go on with the grid
            err.write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
            dt = time.perf_counter() - t0
            return Outcome("failed", f"  {dt:.0f}s  {type(e).__name__}: {e}", dt, resumed=resuming, **me)
        err.unlink(missing_ok=True)
        dt = time.perf_counter() - t0
        acc = summary.get("final_test_acc")
        return Outcome(
            "done",
            f"  {dt:.0f}s  final test acc {acc:.4f}" + ("  (resumed)" if resuming else ""),
            dt,
            summary,
            resuming,
            **me,
        )
    finally:
        claim.release()


def _clear_run(path: Path) -> None:
    """Delete everything in a run folder but its lock (held by the caller): the run starts again."""
    import shutil

    for p in path.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def run_grid(
    runs: Sequence[RunSpec],
    *,
    stale_after: float = 600.0,
    heartbeat: float | None = None,
    since: float | None = None,
    worker: str = "",
    rerun_changed: bool = False,
    log: Callable[[str], None] = print,
) -> GridResult:
    """Run (or skip, or resume) every run once in this process; see docs/experiments.md, "Resume,
    Ctrl-C, failures".

    ``since``: a run whose ``error.txt`` is newer than this time failed in this invocation (another
    worker) and is not retried. Raises ``KeyboardInterrupt`` through (the lock is released, the last
    epoch checkpoint kept).
    """
    heartbeat = heartbeat if heartbeat is not None else default_heartbeat(stale_after)
    since = time.time() if since is None else since
    cache = DataCache()
    res = GridResult()
    prefix = f"[{worker}] " if worker else ""
    width = len(str(len(runs)))
    for i, spec in enumerate(runs):
        out = run_one(
            spec,
            cache,
            stale_after=stale_after,
            heartbeat=heartbeat,
            since=since,
            rerun_changed=rerun_changed,
            log=log,
            prefix=prefix,
        )
        res.counts[out.status] += 1
        if out.status == "failed":
            res.failed.append(spec.rel)
        log(f"{prefix}[{i + 1:{width}d}/{len(runs)}] {out.status:<7s} {spec.rel}{out.note}")
    res.data_loads = cache.loads
    return res


def default_heartbeat(stale_after: float) -> float:
    return max(1.0, min(30.0, stale_after / 4))


def launch_workers(
    grid_file: str,
    out: str,
    workers: int,
    *,
    stale_after: float,
    extra_args: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> int:
    """Run ``workers`` ``rifle bench`` subprocesses on one grid; torch threads = max(1, cores // N).

    The workers run in their own process group: a SIGTERM or Ctrl-C (SIGINT) reaches this process, which
    passes it on to every worker once (each stops its run, keeps its last epoch checkpoint, releases its
    lock), waits for them and returns 143 (SIGTERM) or 130 (SIGINT). A second signal kills the workers
    at once (SIGKILL; their last checkpoints are still whole). See docs/experiments.md, "Resume, Ctrl-C,
    failures".
    """
    import signal
    import subprocess
    import sys

    from ..train.checkpoint import Terminated

    threads = max(1, (os.cpu_count() or 1) // workers)
    since = time.time()
    cmd = [
        sys.executable,
        "-m",
        "rifle",
        "bench",
        str(grid_file),
        "--out",
        str(out),
        "--workers",
        "1",
        "--stale-after",
        str(stale_after),
        "--since",
        repr(since),
        "--threads",
        str(threads),
        "--no-grid-copy",
        *extra_args,
    ]
    group = (
        ({"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True})
        if os.name == "posix"
        else {}
    )
    procs = [subprocess.Popen([*cmd, "--worker-name", f"w{i}"], **group) for i in range(workers)]
    got: int | None = None  # the signal this process received (and passed on)
    while True:
        try:
            codes = [p.wait() for p in procs]
            break
        except KeyboardInterrupt as e:
            signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
            live = [p for p in procs if p.poll() is None]
            if got is None:
                got = signum
                log(
                    f"{name}: stopping the {len(live)} running worker(s); each keeps its run's last epoch "
                    f"checkpoint (a second signal kills them at once)"
                )
                for p in live:
                    _signal(p, signum)
            else:
                log(f"{name} again: killing the {len(live)} remaining worker(s)")
                for p in live:
                    _signal(p, signal.SIGKILL)
    if got is not None:
        return 143 if got == signal.SIGTERM else 130
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N (returncode -N): 128 + N
    for special in (143, 130):
        if special in codes:
            return special
    return max(codes) if codes else 0


@contextlib.contextmanager
def first_signal_only() -> Iterator[None]:
    """In a worker of ``--workers N``: the first SIGINT / SIGTERM raises (``KeyboardInterrupt`` /
    ``Terminated``), later ones are ignored, so that a signal arriving twice (from the parent and from a
    scheduler that signals every process) cannot break the clean-up of the first (the lock's release)."""
    import signal
    import threading

    from ..train.checkpoint import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    saved = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _signal(proc: Any, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except (ProcessLookupError, OSError):  # it ended meanwhile
        pass


def seconds_text(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"
