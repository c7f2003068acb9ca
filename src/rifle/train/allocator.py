"""glibc ``malloc`` settings for training: keep large CPU buffers instead of returning them to the kernel.

With glibc's defaults every activation buffer above its (adaptive) mmap threshold is a fresh ``mmap``, and
freed memory at the top of the heap goes back to the kernel once it exceeds the trim threshold; the next
batch faults the same pages in again. Taking large buffers from the heap and raising the trim threshold
and top pad with ``mallopt(3)`` keeps those pages in the process, at the cost of a higher peak RSS. It
changes where memory comes from, never what is computed. The measurements are in docs/performance.md
("The allocator").

The ``rifle`` command applies :func:`tune_malloc` at start-up (its grid workers too); set
``RIFLE_MALLOC=default`` to keep glibc's own settings. Another allocator (``LD_PRELOAD`` of tcmalloc or
jemalloc) or a non-glibc C library is left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "RIFLE_MALLOC"
# mallopt(3) parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
SETTINGS = {
    # the largest glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); setting it also stops glibc's
    # dynamic threshold adjustment
    "mmap_threshold": (_M_MMAP_THRESHOLD, 32 * 2**20),
    "trim_threshold": (_M_TRIM_THRESHOLD, 2**31 - 1),  # mallopt's value is a C int
    "top_pad": (_M_TOP_PAD, 256 * 2**20),
    # no mmap at all in the main arena: the eval batch's 100 MB activations are reused from the heap too
    "mmap_max": (_M_MMAP_MAX, 0),
}

_applied: str | None = None


def _glibc() -> tuple[ctypes.CDLL | None, str]:
    """glibc, or None and why not."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None, "not changed: not glibc"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # tcmalloc, jemalloc, mimalloc...: their own policies
        return None, f"not changed: another allocator (LD_PRELOAD={preload})"
    try:
        return ctypes.CDLL("libc.so.6"), ""
    except OSError as e:
        return None, f"not changed: {e}"


def tune_malloc() -> str:
    """Apply :data:`SETTINGS` with glibc's ``mallopt`` once per process; returns what was done.

    Idempotent. Returns a short description for the run record: the values set, or why nothing was
    (``RIFLE_MALLOC=default``, another allocator, not glibc).
    """
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice not in ("tuned", "default"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 'tuned' (rifle's default) or 'default'")
    if choice == "default":
        _applied = f"not changed: {ENV}=default"
        return _applied
    libc, why = _glibc()
    if libc is None:
        _applied = why
        return _applied
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    refused = [name for name, (param, value) in SETTINGS.items() if libc.mallopt(param, value) != 1]
    _applied = "glibc tuned: " + ", ".join(f"{name}={value}" for name, (_, value) in SETTINGS.items())
    if refused:
        _applied += f" (refused: {', '.join(refused)})"
    return _applied


def malloc_setting() -> str:
    """What :func:`tune_malloc` did in this process (``"not applied"`` if it was not called)."""
    return _applied if _applied is not None else "not applied"
