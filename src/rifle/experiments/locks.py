"""A run folder's state (done / partial / failed / todo) and the ``run.lock`` by which one worker claims
it: created with ``O_CREAT | O_EXCL``, kept alive by a heartbeat, broken when stale. This is what lets
several ``rifle bench`` processes, on one or several machines, share a grid folder; the rules are in
docs/experiments.md, "Several workers, several machines".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK = "run.lock"
ERROR = "error.txt"


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


def lock_is_stale(
    info: dict[str, Any] | None,
    mtime: float,
    stale_after: float,
    now: float | None = None,
    host: str | None = None,
    owner: str | None = None,
) -> bool:
    """Stale when its pid is dead on this host, or its heartbeat (mtime) is older than ``stale_after``,
    or it carries ``owner`` (not None): the caller's own earlier attempt, known dead (see
    :func:`try_claim`)."""
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


def _break_stale(
    path: Path, seen: dict[str, Any] | None, seen_mtime: float, stale_after: float, owner: str | None = None
) -> None:
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
        same = (info or {}).get("token") == (seen or {}).get("token") and (
            seen is not None or mtime == seen_mtime
        )
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
            json.dump(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "time": time.time(),
                    "token": token,
                    **({"owner": owner} if owner is not None else {}),
                },
                f,
            )
        return Claim(path, token)
    return None
