"""Grids of runs (datasets x models x train fractions x methods x seeds) that survive crashes.

A grid file (YAML, see ``docs/experiments.md``)::

    datasets: [elpv]
    models: [efficientnet_lite0]
    methods:
      - {name: finetune}
      - {name: rifle, reinits: 2}
      - {name: finetune, reg: delta, trick: [dropout]}
      - {name: rifle, reinits: 1, keep_optimizer_state: true, label: rifle-K1-keepopt}
      - {name: rifle, reinits: 3, train_fractions: [0.3]}   # only at some of the grid's fractions
    seeds: [0, 1, 2]
    train_fractions: [0.3, 1.0]
    train: {epochs: 12, image_size: 112, batch_size: 32}   # any TrainConfig key
    baseline: finetune                                      # optional (default: the plain finetune entry)

Each run is ``run_train(cfg)`` into ``OUT/<dataset>/<model>/frac<f>/<label>/seed<s>/`` (the same files
as ``rifle train``). The whole grid is resolved and validated before anything runs.

Crash safety and sharing (several processes, also on several machines sharing ``OUT``):

* a run whose ``summary.json`` says ``complete: true`` is skipped; any other run is started or
  resumed from its last epoch checkpoint (``run_train(..., resume=True)``);
* a worker claims a run by creating ``run.lock`` in its folder with ``O_CREAT | O_EXCL`` (atomic, also
  on NFSv3+); the file holds host, pid, time and a random token; a daemon thread touches it every
  ``heartbeat`` seconds while the run trains;
* stale-lock rule: a lock is stale when its pid is dead on *this* host, or when its mtime (the
  heartbeat) is older than ``stale_after`` seconds (default 600; machines' clocks must agree to
  within that). A stale lock is broken under a second lock (``run.lock.break``, itself stale after
  60 s) after re-reading it, so two workers never both break and re-claim the same run;
* a run that raises is recorded in ``error.txt`` in its folder and the grid goes on; it is not retried
  by a worker of the same ``rifle bench`` invocation, and is retried by the next invocation.

Runs are ordered seed-major (every method for seed 0, then seed 1, ...) so a partial grid already
holds complete paired comparisons; within a seed, runs sharing data are adjacent and each worker
process loads a (dataset, seed, fraction) only once (a small in-process cache).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import socket
import threading
import time
import traceback
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, TrainConfig, resolve

LOCK = "run.lock"
ERROR = "error.txt"
TRAIN_LOG = "train.log"
GRID_FILE = "grid.yaml"
GRID_KEYS = ("datasets", "models", "methods", "seeds", "train_fractions", "train", "baseline",
             "name", "description")
AXIS_KEYS = ("data", "model", "seed", "train_fraction", "out")  # set by the grid, per run
_CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


class GridError(ConfigError):
    """A grid file that cannot be run; the message names the entry and the key."""


# ------------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class MethodEntry:
    """One ``methods:`` entry: TrainConfig values (``method`` = the entry's ``name``) and a label."""

    index: int
    values: dict[str, Any]
    label: str
    explicit_label: bool = False
    train_fractions: tuple[float, ...] | None = None  # None: every fraction of the grid


@dataclass
class Grid:
    datasets: list[str]
    models: list[str]
    methods: list[MethodEntry]
    seeds: list[int]
    train_fractions: list[float]
    train: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    name: str | None = None
    source: str | None = None  # the file it came from
    text: str | None = None    # its text (copied to OUT/grid.yaml)
    spec: dict[str, Any] = field(default_factory=dict)  # the mapping it was parsed from

    def entry(self, label: str) -> MethodEntry:
        return next(e for e in self.methods if e.label == label)


@dataclass
class RunSpec:
    """One run of a grid, fully resolved."""

    seed: int
    dataset: str
    fraction: float
    model: str
    label: str
    cfg: TrainConfig
    path: Path

    @property
    def rel(self) -> str:
        return "/".join(self.path.parts[-5:])

    def data_key(self) -> tuple:
        c = self.cfg
        return (c.data, c.image_size, c.seed, c.val_fraction, c.train_fraction, c.skip_bad_images)


def safe_name(text: str) -> str:
    """A folder-safe version of ``text`` (letters, digits, ``._+=-``; anything else -> ``_``)."""
    out = _SAFE.sub("_", str(text)).strip("_.")
    return out or "_"


def _hint(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _as_list(value: Any, key: str) -> list:
    if value is None:
        raise GridError(f"grid: {key!r} is required")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise GridError(f"grid: {key!r} is empty")
    if len(set(map(repr, items))) != len(items):
        raise GridError(f"grid: {key!r} lists a value twice: {items}")
    return items


def _norm_keys(d: dict, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise GridError(f"{where}: expected a mapping, got {type(d).__name__} {d!r}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def default_label(values: dict[str, Any], cfg: TrainConfig) -> str:
    """``rifle-K2``, ``finetune+delta+dropout``, ``rifle-K1+keep-optimizer-state``, ``l2sp.alpha=0.1``.

    The method (with K for RIFLE), then the regulariser when not ``l2``, the tricks, then every other
    key the entry sets (``key`` for true, ``no-key`` for false, ``key=value`` otherwise) and options.
    """
    parts = [f"rifle-K{cfg.reinits}" if cfg.method == "rifle" else cfg.method]
    if cfg.reg != "l2":
        parts.append(cfg.reg)
    parts += list(cfg.trick)
    for k in sorted(values):
        if k in ("method", "reg", "trick", "options", "label") or (k == "reinits" and cfg.method == "rifle"):
            continue
        v, name = values[k], k.replace("_", "-")
        parts.append(name if v is True else f"no-{name}" if v is False else f"{name}={_fmt(v)}")
    for m, opts in sorted((values.get("options") or {}).items()):
        for k, v in sorted(opts.items()):
            parts.append(f"{m}.{k}={_fmt(v)}")
    return safe_name("+".join(parts))


def _method_values(i: int, raw: Any, grid_fractions: list[float]
                   ) -> tuple[dict[str, Any], str | None, tuple[float, ...] | None]:
    where = f"methods[{i}]"
    d = _norm_keys(raw if not isinstance(raw, str) else {"name": raw}, where)
    label = d.pop("label", None)
    fracs = d.pop("train_fractions", None)
    if fracs is not None:
        try:
            fracs = tuple(float(f) for f in (fracs if isinstance(fracs, (list, tuple)) else [fracs]))
        except (TypeError, ValueError):
            raise GridError(f"{where} ({label or d.get('name')}): train_fractions must be numbers") from None
        if not fracs or not set(fracs) <= set(grid_fractions):
            raise GridError(f"{where} ({label or d.get('name')}): train_fractions {list(fracs)} must be a "
                            f"non-empty subset of the grid's train_fractions {grid_fractions}")
    if "name" in d and "method" in d:
        raise GridError(f"{where}: give the method once (name: or method:), not both")
    name = d.pop("name", d.pop("method", None))
    if not name:
        raise GridError(f"{where} {raw!r}: needs name: (finetune, rifle, ...)")
    where = f"methods[{i}] ({label or name})"
    for k in d:
        if k in AXIS_KEYS:
            raise GridError(f"{where}: {k!r} is set by the grid (datasets/models/seeds/train_fractions/"
                            f"--out), not by a method entry")
        if k not in _CONFIG_KEYS:
            raise GridError(f"{where}: unknown key {k!r}{_hint(k, _CONFIG_KEYS | {'name', 'label'})}")
    if isinstance(d.get("trick"), str):
        d["trick"] = [t for t in d["trick"].split(",") if t]
    return {"method": str(name), **d}, (None if label is None else str(label)), fracs


def parse_grid(spec: dict[str, Any], source: str | None = None, text: str | None = None) -> Grid:
    """Check a grid mapping (keys, types, labels); :func:`expand` resolves every run."""
    where = f"grid {source}" if source else "grid"
    spec = _norm_keys(spec, where)
    for k in spec:
        if k not in GRID_KEYS:
            raise GridError(f"{where}: unknown key {k!r}{_hint(k, GRID_KEYS)}; keys: {', '.join(GRID_KEYS)}")
    train = _norm_keys(spec.get("train") or {}, f"{where}: train")
    for k in train:
        if k in AXIS_KEYS:
            raise GridError(f"{where}: train: {k!r} is set by the grid, not in train:")
        if k not in _CONFIG_KEYS:
            raise GridError(f"{where}: train: unknown key {k!r}{_hint(k, _CONFIG_KEYS)}")
    datasets = [str(d) for d in _as_list(spec.get("datasets"), "datasets")]
    models = [str(m) for m in _as_list(spec.get("models"), "models")]
    seeds = _as_list(spec.get("seeds"), "seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise GridError(f"{where}: seeds must be integers, got {seeds}")
    fracs = _as_list(spec.get("train_fractions", [1.0]), "train_fractions")
    try:
        fracs = [float(f) for f in fracs]
    except (TypeError, ValueError):
        raise GridError(f"{where}: train_fractions must be numbers in (0, 1], got {fracs}") from None
    if not all(0 < f <= 1 for f in fracs):
        raise GridError(f"{where}: train_fractions must be in (0, 1], got {fracs}")
    raw_methods = spec.get("methods")
    if not isinstance(raw_methods, list) or not raw_methods:
        raise GridError(f"{where}: methods: expected a non-empty list of entries like {{name: rifle, reinits: 2}}")
    entries = []
    for i, raw in enumerate(raw_methods):
        values, label, entry_fracs = _method_values(i, raw, fracs)
        try:
            cfg = resolve({**train, **values})
        except (ConfigError, TypeError) as e:
            raise GridError(f"methods[{i}] ({label or values['method']}): {e}") from None
        explicit = label is not None
        if explicit and safe_name(label) != label:
            raise GridError(f"methods[{i}]: label {label!r} must use only letters, digits and ._+=- "
                            f"(it names a folder); e.g. {safe_name(label)!r}")
        entries.append(MethodEntry(i, values, label if explicit else default_label(values, cfg), explicit,
                                   entry_fracs))
    seen: dict[str, int] = {}
    for e in entries:
        if e.label in seen:
            raise GridError(f"methods[{seen[e.label]}] and methods[{e.index}] both have the label "
                            f"{e.label!r}; give one an explicit label:")
        seen[e.label] = e.index
    for kind, names in (("datasets", datasets), ("models", models)):
        folders = [safe_name(Path(n).name if kind == "datasets" else n) for n in names]
        if len(set(folders)) != len(folders):
            raise GridError(f"{where}: {kind} {names} map to clashing folder names {folders}")
    baseline = spec.get("baseline")
    if baseline is None:
        baseline = next((e.label for e in entries if e.label == "finetune"), None)
    elif str(baseline) not in seen:
        raise GridError(f"{where}: baseline {baseline!r} is not a method label; labels: {', '.join(seen)}")
    return Grid(datasets=datasets, models=models, methods=entries, seeds=[int(s) for s in seeds],
                train_fractions=fracs, train=train, baseline=None if baseline is None else str(baseline),
                name=spec.get("name"), source=source, text=text, spec=spec)


def load_grid(path: str | Path) -> Grid:
    p = Path(path)
    if not p.is_file():
        raise GridError(f"grid file {p}: no such file")
    text = p.read_text()
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise GridError(f"grid file {p}: not valid YAML: {e}") from None
    return parse_grid(spec, source=str(p), text=text)


def run_path(out: str | Path, dataset: str, model: str, fraction: float, label: str, seed: int) -> Path:
    return (Path(out) / safe_name(Path(dataset).name) / safe_name(model) / f"frac{fraction:g}"
            / label / f"seed{seed}")


def expand(grid: Grid, out: str | Path) -> list[RunSpec]:
    """Every run of the grid, resolved and validated, seed-major (see module docstring)."""
    from ..core.schedule import make_schedule
    from ..run import build_methods
    runs = []
    for seed in grid.seeds:
        for dataset in grid.datasets:
            for frac in grid.train_fractions:
                for model in grid.models:
                    for e in grid.methods:
                        if e.train_fractions is not None and frac not in e.train_fractions:
                            continue
                        path = run_path(out, dataset, model, frac, e.label, seed)
                        where = f"methods[{e.index}] ({e.label}) on {dataset}/{model}/frac{frac:g}/seed{seed}"
                        extra = {**dict(grid.train.get("extra") or {}),
                                 "grid": {"label": e.label, "dataset": dataset, "model": model,
                                          "train_fraction": frac, "seed": seed}}
                        values = {**grid.train, **e.values, "data": dataset, "model": model, "seed": seed,
                                  "train_fraction": frac, "out": str(path), "extra": extra}
                        try:
                            cfg = resolve(values)
                            build_methods(cfg)  # unknown method / reg / trick / option names
                            if cfg.method == "rifle" and cfg.reinit_granularity == "epoch":
                                make_schedule(cfg.epochs, cfg.reinits, cfg.guard, warn=False)
                        except (ValueError, TypeError) as err:
                            raise GridError(f"{where}: {err}") from None
                        runs.append(RunSpec(seed, dataset, frac, model, e.label, cfg, path))
    return runs


# ------------------------------------------------------------------------------------------ run state
def is_complete(path: Path) -> bool:
    try:
        return bool(json.loads((Path(path) / "summary.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def run_status(path: Path) -> str:
    """``done`` | ``partial`` (has a checkpoint or files) | ``failed`` (error.txt) | ``todo``."""
    p = Path(path)
    if is_complete(p):
        return "done"
    if (p / ERROR).is_file():
        return "failed"
    if (p / "state.pt").is_file() or (p / "config.yaml").is_file():
        return "partial"
    return "todo"


# ------------------------------------------------------------------------------------------ locks
def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: rely on heartbeats
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(Path(path).read_text())
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def lock_is_stale(info: dict[str, Any] | None, mtime: float, stale_after: float,
                  now: float | None = None, host: str | None = None, owner: str | None = None) -> bool:
    """Stale when its pid is dead on this host, or its heartbeat (mtime) is older than ``stale_after``,
    or it carries ``owner`` (not None): the caller's own earlier attempt, known dead (see :func:`try_claim`)."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if owner is not None and info and info.get("owner") == owner:
        return True
    if now - mtime > stale_after:
        return True
    if info and info.get("host") == host and isinstance(info.get("pid"), int):
        return not _pid_alive(info["pid"])
    return False


@dataclass
class Claim:
    path: Path
    token: str
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start_heartbeat(self, every: float) -> None:
        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    os.utime(self.path)
                except OSError:
                    pass
        self._thread = threading.Thread(target=beat, name=f"heartbeat {self.path}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = read_lock(self.path)
        if info is not None and info.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


BREAK_STALE_AFTER = 60.0


def _break_stale(path: Path, seen: dict[str, Any] | None, seen_mtime: float, stale_after: float,
                 owner: str | None = None) -> None:
    """Remove a stale lock, under ``<lock>.break`` so that only one worker breaks a given lock."""
    brk = Path(str(path) + ".break")
    try:
        fd = os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - brk.stat().st_mtime > BREAK_STALE_AFTER:
                os.unlink(brk)  # a breaker died in this tiny window; the next attempt proceeds
        except FileNotFoundError:
            pass
        return
    try:
        os.close(fd)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        info = read_lock(path)
        same = (info or {}).get("token") == (seen or {}).get("token") and (seen is not None or mtime == seen_mtime)
        if same and lock_is_stale(info, mtime, stale_after, owner=owner):
            os.unlink(path)
    finally:
        try:
            os.unlink(brk)
        except FileNotFoundError:
            pass


def try_claim(folder: Path, stale_after: float = 600.0, owner: str | None = None) -> Claim | None:
    """Atomically claim the run in ``folder``; ``None`` when another live worker holds it.

    ``owner`` (recorded in the lock): a lock that already carries the same owner is taken over at once.
    The Ray engine passes one owner per (invocation, run) and submits each run once per invocation, so
    such a lock can only be an earlier attempt of the same task, which Ray retries only after that
    attempt's worker (or node) died; without this a retry on another host would wait ``stale_after``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    for _ in range(3):
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            info = read_lock(path)
            if not lock_is_stale(info, mtime, stale_after, owner=owner):
                return None
            _break_stale(path, info, mtime, stale_after, owner=owner)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                       "token": token, **({"owner": owner} if owner is not None else {})}, f)
        return Claim(path, token)
    return None


# ------------------------------------------------------------------------------------------ running
class DataCache:
    """The last few data bundles, keyed by everything :func:`rifle.run.load_data` reads."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.items: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0

    def get(self, spec: RunSpec):
        from ..run import load_data
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


def run_one(spec: RunSpec, cache: DataCache, *, stale_after: float = 600.0, heartbeat: float = 30.0,
            since: float | None = None, owner: str | None = None,
            log: Callable[[str], None] = print, prefix: str = "") -> Outcome:
    """Skip, claim and train (or resume) one run; the per-run step of both engines.

    A run that raises is written to ``error.txt`` and returned as ``failed``; ``KeyboardInterrupt``
    goes through (the lock is released, the last epoch checkpoint kept). ``since``: an ``error.txt``
    at least that recent failed in this invocation and is not retried.
    """
    from ..run import run_train
    me = dict(host=socket.gethostname(), pid=os.getpid())
    if is_complete(spec.path):
        return Outcome("skipped", "  (complete)", **me)
    err = spec.path / ERROR
    if since is not None and err.is_file() and err.stat().st_mtime >= since:
        return Outcome("skipped", "  (failed earlier in this invocation, see error.txt)", **me)
    claim = try_claim(spec.path, stale_after, owner=owner)
    if claim is None:
        info = read_lock(spec.path / LOCK) or {}
        return Outcome("busy", f"  (claimed by {info.get('host')}:{info.get('pid')})", **me)
    try:
        if is_complete(spec.path):  # finished by another worker just before we claimed it
            return Outcome("skipped", "  (complete)", **me)
        claim.start_heartbeat(heartbeat)
        t0 = time.perf_counter()
        resuming = (spec.path / "state.pt").is_file()
        try:
            data = cache.get(spec)
            summary = run_train(spec.cfg, resume=True, data=data, log=_file_log(spec.path), progress=False)
            if not summary.get("complete"):
                raise RuntimeError(f"run ended after {summary.get('epochs_run')} of {spec.cfg.epochs} epochs")
        except KeyboardInterrupt:
            log(f"{prefix}interrupted during {spec.rel}; its last epoch checkpoint is kept, "
                f"re-run the same command to resume")
            raise
        except Exception as e:  # noqa: BLE001 - record any failure and go on with the grid
            err.write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
            dt = time.perf_counter() - t0
            return Outcome("failed", f"  {dt:.0f}s  {type(e).__name__}: {e}", dt, resumed=resuming, **me)
        err.unlink(missing_ok=True)
        dt = time.perf_counter() - t0
        acc = summary.get("final_test_acc")
        return Outcome("done", f"  {dt:.0f}s  final test acc {acc:.4f}" + ("  (resumed)" if resuming else ""),
                       dt, summary, resuming, **me)
    finally:
        claim.release()


def run_grid(runs: Sequence[RunSpec], *, stale_after: float = 600.0, heartbeat: float | None = None,
             since: float | None = None, worker: str = "", log: Callable[[str], None] = print) -> GridResult:
    """Run (or skip, or resume) every run once in this process; see the module docstring.

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
        out = run_one(spec, cache, stale_after=stale_after, heartbeat=heartbeat, since=since, log=log,
                      prefix=prefix)
        res.counts[out.status] += 1
        if out.status == "failed":
            res.failed.append(spec.rel)
        log(f"{prefix}[{i + 1:{width}d}/{len(runs)}] {out.status:<7s} {spec.rel}{out.note}")
    res.data_loads = cache.loads
    return res


def default_heartbeat(stale_after: float) -> float:
    return max(1.0, min(30.0, stale_after / 4))


def write_grid_copy(grid: Grid, out: str | Path) -> None:
    """``OUT/grid.yaml``: the grid text this folder was (last) run with, for ``rifle report``."""
    from ..train.checkpoint import atomic_write_text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = grid.text if grid.text is not None else yaml.safe_dump(grid.spec, sort_keys=False)
    header = f"# copied by `rifle bench` from {grid.source}\n" if grid.source else ""
    atomic_write_text(out / GRID_FILE, header + text)


def launch_workers(grid_file: str, out: str, workers: int, *, stale_after: float,
                   extra_args: Sequence[str] = ()) -> int:
    """Run ``workers`` ``rifle bench`` subprocesses on one grid; torch threads = max(1, cores // N)."""
    import subprocess
    import sys
    threads = max(1, (os.cpu_count() or 1) // workers)
    since = time.time()
    cmd = [sys.executable, "-m", "rifle", "bench", str(grid_file), "--out", str(out), "--workers", "1",
           "--stale-after", str(stale_after), "--since", repr(since), "--threads", str(threads),
           "--no-grid-copy", *extra_args]
    procs = [subprocess.Popen([*cmd, "--worker-name", f"w{i}"]) for i in range(workers)]
    codes = []
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the children got the same SIGINT; let them release their locks
        codes = [p.wait() for p in procs]
        return 130
    if any(c == 130 for c in codes):
        return 130
    return max(codes) if codes else 0


def seconds_text(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"
