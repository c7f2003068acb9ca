"""``rifle bench --engine ray``: every run of a grid is one Ray task, on one machine or a cluster.

Ray Core tasks (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018,
arXiv:1712.05889; https://docs.ray.io/en/latest/ray-core/tasks.html), not Ray Tune: a task runs
:func:`rifle.experiments.runner.run_one` on the worker, which writes the run folder on shared storage.
Ray is imported only here. Design, faults and progress: docs/experiments.md, "On a cluster".
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from .grid import RunSpec, config_changes
from .locks import ERROR, LOCK, _pid_alive, is_complete, read_lock
from .runner import DataCache, GridResult, Outcome, default_heartbeat, run_one, seconds_text


class EngineError(ValueError):
    """``--engine ray`` cannot run: Ray missing, or the cluster cannot hold one run."""


def _dist_name() -> str:
    try:
        from importlib.metadata import packages_distributions

        return (packages_distributions().get("rifle") or ["rifle"])[0]
    except Exception:  # noqa: BLE001 - only used in a hint
        return "rifle"


def require_ray():
    """The ``ray`` module, or an :class:`EngineError` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise EngineError(
            f"--engine ray needs Ray, which is not installed here ({e}). Install it on the "
            f"driver and on every node: pip install '{_dist_name()}[ray]' "
            f"(or pip install 'ray>=2.9'); or use the default --engine local"
        ) from None
    return ray


# ------------------------------------------------------------------------------------------ the task
_CACHE: DataCache | None = None  # per worker process: Ray reuses workers, so data loads once per process


@dataclass(frozen=True)
class TaskOptions:
    cwd: str
    owner: str
    stale_after: float
    heartbeat: float
    since: float | None
    threads: int
    cpu_only: bool
    rerun_changed: bool = False


def execute(spec: RunSpec, opts: TaskOptions) -> Outcome:
    """The body of one Ray task (also callable without Ray): run ``spec`` on this worker."""
    global _CACHE
    if os.getcwd() != opts.cwd:
        try:
            os.chdir(opts.cwd)
        except OSError as e:
            raise EngineError(
                f"the driver's working directory {opts.cwd} is not reachable on this node "
                f"({e}): start rifle bench from a directory on shared storage"
            ) from None
    import torch

    from ..train.allocator import tune_malloc

    tune_malloc()  # as the rifle command does at start-up
    if opts.threads and spec.cfg.threads is None:
        torch.set_num_threads(opts.threads)
    if opts.cpu_only and spec.cfg.device == "auto":
        spec = replace(spec, cfg=replace(spec.cfg, device="cpu"))
    if _CACHE is None:
        _CACHE = DataCache()
    with _interruptible():
        return run_one(
            spec,
            _CACHE,
            stale_after=opts.stale_after,
            heartbeat=opts.heartbeat,
            since=opts.since,
            owner=opts.owner,
            rerun_changed=opts.rerun_changed,
            log=lambda line: None,
        )


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Python's own SIGINT handler while the task runs, so that ``ray.cancel`` can interrupt it.

    Ray cancels a running task with ``_thread.interrupt_main()``, which does nothing (and Ray still
    reports the cancel as done) when SIGINT is ignored in the worker - as it is whenever the cluster was
    started by a process that ignores SIGINT (a background job ``ray start ... &`` of a script, many CI
    and batch launchers): the workers inherit that disposition. (Ray's workers block the real SIGINT
    signal in this thread, so only a cancel raises here.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous not in (signal.SIG_IGN, signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------ progress
@dataclass
class Progress:
    """Driver-side output: one line per event; on a terminal also a live status line at the bottom."""

    total: int
    slots: float
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    tty: bool | None = None
    counts: Counter = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    started: dict[int, float] = field(default_factory=dict)  # run index -> when it was seen running
    queued: int = 0
    _status_shown: bool = False

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def eta(self, now: float | None = None) -> float:
        """Seconds left: mean duration of the runs done so far x the work left / parallel slots."""
        if not self.durations:
            return math.nan
        now = time.time() if now is None else now
        mean = sum(self.durations) / len(self.durations)
        left = mean * self.queued + sum(max(0.0, mean - (now - t)) for t in self.started.values())
        return left / max(1.0, self.slots)

    def state(self) -> str:
        c = self.counts
        return (
            f"{c['done'] + c['skipped']}/{self.total} done, {len(self.started)} running, "
            f"{self.queued} queued, {c['failed']} failed, ETA {seconds_text(self.eta())}"
        )

    def event(self, i: int, status: str, rel: str, note: str = "") -> None:
        width = len(str(self.total))
        line = f"[{i + 1:{width}d}/{self.total}] {status:<7s} {rel}{note}"
        if self.tty:
            self.stream.write("\r\033[K" + line + "\n" + self.state())
            self._status_shown = True
        else:
            self.stream.write(f"{line}  | {self.state()}\n")
        self.stream.flush()

    def refresh(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.state())
            self.stream.flush()
            self._status_shown = True

    def close(self) -> None:
        if self.tty and self._status_shown:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------------------------------ the driver
def check_address(address: str | None, timeout: float = 3.0) -> None:
    """A ``HOST:PORT`` address must answer a TCP connection within ``timeout`` seconds: ``ray.init``
    would otherwise retry for minutes before giving up. Other forms (``auto``, ``ray://``) go to Ray."""
    from ..models.offline import reachable  # the models' hub check: DNS bounded by the timeout too

    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(
            f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by "
            f"default), 'auto', or ray://HOST:PORT"
        )
    if not reachable(f"tcp://{address}", timeout)[0]:
        raise EngineError(
            f"--address {address}: no Ray cluster answers there within {timeout:g} s; "
            f"start one with `ray start --head --port {port}` on {host}, or leave "
            f"--address out to start a local one"
        )


def connect(address: str | None):
    """``ray.init``: ``None`` = RAY_ADDRESS, else a cluster started with ``ray start`` on this machine,
    else a new one-machine cluster; ``auto`` = an existing cluster; ``HOST:PORT`` = that cluster."""
    import signal
    import threading

    ray = require_ray()
    if not ray.is_initialized():
        check_address(address)
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")
        except ConnectionError as e:
            raise EngineError(
                f"--address {address}: no Ray cluster to join ({e}); start one with "
                f"`ray start --head`, or leave --address out to start a local one"
            ) from None
        finally:
            if sigterm is not None:  # ray.init installs sys.exit on SIGTERM; rifle's handler (like Ctrl-C:
                signal.signal(signal.SIGTERM, sigterm)  # cancel the tasks, keep checkpoints) stays
    return ray


def _capacity(ray, cpus: float, gpus: float) -> float:
    res = ray.cluster_resources()
    have_cpu, have_gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if cpus > have_cpu:
        raise EngineError(
            f"--cpus-per-run {cpus:g}: the Ray cluster has {have_cpu:g} CPUs in all; no run could start"
        )
    if gpus > have_gpu:
        raise EngineError(
            f"--gpus-per-run {gpus:g}: the Ray cluster has {have_gpu:g} GPUs in all "
            f"(start each node with `ray start ... --num-gpus N`, or use --gpus-per-run 0)"
        )
    slots = have_cpu / cpus if cpus > 0 else math.inf
    if gpus > 0:
        slots = min(slots, have_gpu / gpus)
    return slots if math.isfinite(slots) else 1.0


def _record_failure(spec: RunSpec, text: str) -> None:
    try:
        spec.path.mkdir(parents=True, exist_ok=True)
        (spec.path / ERROR).write_text(text)
    except OSError:
        pass


def run_grid_ray(
    runs: Sequence[RunSpec],
    *,
    address: str | None = None,
    cpus_per_run: float = 1.0,
    gpus_per_run: float = 0.0,
    max_retries: int = 3,
    threads: int | None = None,
    stale_after: float = 600.0,
    since: float | None = None,
    poll: float = 1.0,
    stream: TextIO | None = None,
    tty: bool | None = None,
    rerun_changed: bool = False,
) -> GridResult:
    """Run every unfinished run of ``runs`` as a Ray task; see docs/experiments.md, "On a cluster".

    Returns the counts of this pass (done / skipped / failed). ``KeyboardInterrupt`` stops the
    submitted tasks (:func:`_stop_tasks`: each keeps its last epoch checkpoint) and goes through.
    """
    if cpus_per_run <= 0 and gpus_per_run <= 0:
        raise EngineError("--cpus-per-run and --gpus-per-run are both 0: each run must reserve something")
    if cpus_per_run < 0 or gpus_per_run < 0:
        raise EngineError("--cpus-per-run / --gpus-per-run must be >= 0")
    if max_retries < 0:
        raise EngineError(f"--max-retries {max_retries}: must be >= 0")
    connected = not _ray_initialized()
    ray = connect(address)
    slots = _capacity(ray, cpus_per_run, gpus_per_run)
    heartbeat = default_heartbeat(stale_after)
    opts = TaskOptions(
        cwd=os.getcwd(),
        owner=f"ray:{uuid.uuid4().hex}",
        stale_after=stale_after,
        heartbeat=heartbeat,
        since=time.time() if since is None else since,
        threads=threads or max(1, math.floor(cpus_per_run)),
        cpu_only=gpus_per_run == 0,
        rerun_changed=rerun_changed,
    )
    task = ray.remote(execute)
    resources = dict(
        num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=max_retries, retry_exceptions=False
    )
    prog = Progress(len(runs), slots, stream or sys.stdout, tty)
    res = GridResult()
    pending: dict[Any, int] = {}  # object ref -> run index
    deferred: dict[int, float] = {}  # run index -> when to ask again (held by someone else)
    said_busy: set[int] = set()

    def submit(i: int) -> None:
        pending[task.options(name=f"rifle {runs[i].rel}", **resources).remote(runs[i], opts)] = i

    def count_queued() -> None:
        prog.queued = sum(1 for j in pending.values() if j not in prog.started) + len(deferred)

    def finish(i: int, status: str, note: str, seconds: float = 0.0) -> None:
        prog.started.pop(i, None)
        prog.counts[status] += 1
        res.counts[status] += 1
        if status == "failed":
            res.failed.append(runs[i].rel)
        if status == "done":
            prog.durations.append(seconds)
        count_queued()
        prog.event(i, status, runs[i].rel, note)

    terms: list[int] = []  # SIGTERMs seen: Ray turns an exception raised in its waits into KeyboardInterrupt
    previous = _note_sigterm(terms)
    try:
        todo = [
            i
            for i, spec in enumerate(runs)
            if not is_complete(spec.path) or (rerun_changed and config_changes(spec))
        ]
        for i in todo:
            submit(i)
        for i in sorted(set(range(len(runs))) - set(todo)):
            finish(i, "skipped", "  (complete)")
        count_queued()
        prog.refresh()
        last_look = 0.0
        while pending or deferred:
            now = time.time()
            for i, when in list(deferred.items()):
                if now >= when:
                    del deferred[i]
                    submit(i)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll) if pending else ([], [])
            if not ready and not pending:
                time.sleep(min(poll, max(0.0, min(deferred.values()) - time.time())))
            for ref in ready:
                i = pending.pop(ref)
                spec = runs[i]
                try:
                    out: Outcome = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # raised outside run_one's own catch (setup)
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    _record_failure(spec, f"{type(cause).__name__}: {cause}\n\n{e}")
                    finish(i, "failed", f"  {type(cause).__name__}: {cause}")
                    continue
                except ray.exceptions.RayError as e:  # the worker or node died max_retries + 1 times
                    _record_failure(
                        spec,
                        f"{type(e).__name__} after {max_retries} retries (the worker process "
                        f"or node running this run died each time; out of memory?)\n\n{e}",
                    )
                    finish(i, "failed", f"  {type(e).__name__} (worker died {max_retries + 1} times)")
                    continue
                if out.status == "busy":
                    deferred[i] = time.time() + heartbeat
                    if i not in said_busy:
                        said_busy.add(i)
                        count_queued()
                        prog.event(i, "busy", spec.rel, out.note + ", waiting for it")
                    continue
                finish(i, out.status, out.note, out.seconds)
            if time.time() - last_look >= poll:  # which submitted runs hold our lock: running
                last_look = time.time()
                for i in pending.values():
                    info = read_lock(runs[i].path / LOCK) or {}
                    mine = bool(info) and info.get("owner") == opts.owner
                    if mine and i not in prog.started:  # a retried run (its worker died) stays running
                        prog.started[i] = time.time()
                        count_queued()
                        prog.event(i, "started", runs[i].rel, f"  on {info.get('host')}:{info.get('pid')}")
                count_queued()
                prog.refresh()
    except KeyboardInterrupt as e:
        _stop_tasks(ray, pending, runs, opts.owner, prog, shutdown=connected)
        from ..train.checkpoint import Terminated

        if terms and not isinstance(e, Terminated):
            raise Terminated from None  # what the caller's handler raised (exit status 143)
        raise
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
        prog.close()
    return res


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


COOPERATIVE_S = 5.0  # how long an interrupted task may take to stop by itself (its checkpoint is on disk)
FORCE_S = 5.0  # then Ray's force-cancel, re-sent each second
KILL_S = 5.0  # then the worker's pid from run.lock, on this host


def _stop_tasks(
    ray, pending: dict, runs: Sequence[RunSpec], owner: str, prog: Progress, shutdown: bool
) -> None:
    """Stop every task of this pass; on this host, return only when none of them runs any more.

    1. ``ray.cancel``: the task's ``KeyboardInterrupt`` releases its lock and keeps its last epoch
       checkpoint (checkpoints are written atomically, so any later stop keeps a whole one too);
    2. a task still running after ``COOPERATIVE_S`` is force-cancelled (its worker killed), re-sent
       each second for ``FORCE_S`` (Ray drops a cancel while the previous one is unanswered);
    3. whatever Ray reports, the run folders decide: a ``run.lock`` of this invocation that names a
       live process on this host is a task still training; that process is killed (SIGKILL) and waited
       for, up to ``KILL_S``;
    4. a driver that connected itself disconnects: Ray then ends its remaining workers on every node.
    A run whose task is still alive on this host after all that is named on stderr.
    """
    for ref in pending:
        ray.cancel(ref)
    _wait_for(ray, pending, COOPERATIVE_S)
    deadline = time.time() + FORCE_S
    while pending and time.time() < deadline:
        for ref in pending:
            ray.cancel(ref, force=True)
        _wait_for(ray, pending, 1.0)
    killed: dict[int, int] = {}  # run index -> pid
    deadline = time.time() + KILL_S
    while True:
        live = {i: pid for i, spec in enumerate(runs) if (pid := _live_task_pid(spec, owner)) is not None}
        if not live or time.time() > deadline:
            break
        for i, pid in live.items():
            if killed.get(i) != pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed[i] = pid
                except OSError:
                    pass
        time.sleep(0.05)
    for i, pid in sorted(killed.items()):
        prog.event(
            i, "killed", runs[i].rel, f"  (pid {pid}: its cancel went unanswered; last checkpoint kept)"
        )
    if shutdown:
        ray.shutdown()  # Ray ends the workers of a disconnected driver, on every node
    for i, pid in sorted(live.items()):
        print(
            f"rifle bench: could not stop the task of {runs[i].path} (pid {pid} on this host, "
            f"still alive {KILL_S:g} s after SIGKILL); stop it before re-running",
            file=sys.stderr,
            flush=True,
        )


def _live_task_pid(spec: RunSpec, owner: str) -> int | None:
    """The pid of a live process on this host that holds ``spec``'s lock for this invocation."""
    info = read_lock(spec.path / LOCK)
    if not info or info.get("owner") != owner or info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or not _running(pid):
        return None
    started = _process_start(pid)
    if started is not None and started > float(info.get("time", 0.0)) + 1.0:
        return None  # a newer process that reuses the pid of the lock's dead holder
    return pid


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a killed worker its parent has not reaped yet)."""
    if not _pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False  # ended meanwhile
    except (OSError, IndexError):
        return True  # no /proc (not Linux): alive by kill(pid, 0)


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), on Linux; None elsewhere or when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _wait_for(ray, pending: dict, seconds: float) -> None:
    """Wait up to ``seconds`` for the tasks of ``pending`` (removed from it as they end)."""
    deadline = time.time() + seconds
    while pending and time.time() < deadline:
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=max(0.1, deadline - time.time()))
        for ref in done:
            pending.pop(ref)
        if not done:
            break


def _note_sigterm(terms: list[int]):
    """Wrap a Python SIGTERM handler so that ``terms`` records each SIGTERM; returns the handler to
    restore (None: nothing was wrapped)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return None

    def on_sigterm(signum, frame):
        terms.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    return previous
