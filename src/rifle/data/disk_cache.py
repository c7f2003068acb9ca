"""The decode cache: image files decoded once per machine into a memory-mapped uint8 file.

:func:`decode_files` is the one way to decode a list of image files for training. With the cache on
(the default: ``$RIFLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/rifle`` or ``~/.cache/rifle``) the images
live in ``<cache dir>/<key>/images.u8`` (raw ``uint8 [M, C, R, R]``) beside ``meta.json`` and are
returned memory-mapped: runs, grid workers and DDP ranks of one machine share one copy in the page
cache, and RAM is not bounded by the dataset's size. ``key`` is the SHA-256 of every file's path,
size and modification time (in order), the resolution, the channel rule, the decoder version and
Pillow's version, so a changed file gives a new entry. An entry is written in a temporary folder
beside it, fsynced, then renamed into place; a reader only sees complete entries. docs/data.md,
"Decode cache".
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import PIL
import torch
from PIL import Image

from .decode import PROGRESS_MIN_FILES, DataError, _num_threads, decode_image

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the atomic rename still protects entries
    fcntl = None  # type: ignore[assignment]

__all__ = ["CACHE_ENV", "CACHE_OFF", "DECODER_VERSION", "Decoded", "decode_files", "resolve_cache_dir"]

CACHE_ENV = "RIFLE_CACHE_DIR"
CACHE_OFF = "off"
DECODER_VERSION = 1  # bump when decode_image's output changes: every entry is then rebuilt
FORMAT = 1  # the entry's layout (images.u8 + meta.json)
CHANNEL_RULE = "3 if any decoded image is RGB (1-channel images broadcast), else 1"
RACY_NS = 2_000_000_000  # files modified this recently may change again within their mtime's tick
IMAGES, META = "images.u8", "meta.json"
_USE_LOCK = True  # tests turn it off to race two writers


@dataclass
class Decoded:
    """What :func:`decode_files` returns.

    ``images`` uint8 ``[M, C, R, R]`` (memory-mapped read-only from the cache entry when the cache is
    on: never write to it), ``ok`` the ascending positions in ``paths`` of those M images,
    ``errors`` ``(path, "Type: message")`` of the files that could not be decoded, ``source`` one of
    "disk cache", "decoded" (and written to the cache), "decoded (not cached)", and ``entry`` the
    cache entry's folder (None when nothing was kept on disk).
    """

    images: torch.Tensor
    ok: list[int]
    errors: list[tuple[Path, str]]
    source: str
    entry: Path | None = None

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, list[int]]:
        """The images of ``paths[start:stop]`` that decoded (a view, no copy) and their positions."""
        lo, hi = bisect.bisect_left(self.ok, start), bisect.bisect_left(self.ok, stop)
        return self.images[lo:hi], self.ok[lo:hi]


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The decode cache folder for a ``cache_dir`` setting; None when the cache is off.

    ``None`` or ``""``: ``$RIFLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/rifle``, else ``~/.cache/rifle``;
    ``"off"`` (either place, any case): no disk cache, images are decoded into memory.
    """
    value = os.fspath(cache_dir) if cache_dir is not None else ""
    value = value or os.environ.get(CACHE_ENV, "")
    if value.strip().lower() == CACHE_OFF:
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rifle"


def _stat_key(paths: Sequence[Path], res: int) -> tuple[str, bool]:
    """``(key, racy)``: the entry's SHA-256 and whether a file changed too recently to trust its mtime."""
    now = time.time_ns()
    h = hashlib.sha256()
    head = {"format": FORMAT, "decoder": DECODER_VERSION, "pillow": PIL.__version__, "res": res}
    h.update(json.dumps({**head, "channels": CHANNEL_RULE, "n": len(paths)}, sort_keys=True).encode())
    racy = False
    for p in paths:
        a = os.path.abspath(p)
        try:
            st = os.stat(a)
            h.update(f"{a}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            racy = racy or st.st_mtime_ns > now - RACY_NS
        except OSError:
            h.update(f"{a}\0missing\n".encode())
    return h.hexdigest(), racy


def _header_channels(path: Path) -> int:
    """1 or 3 as :func:`decode_image` will give, from the header alone; 0 when it cannot be opened."""
    try:
        with Image.open(path) as img:
            mode = img.mode
    except Exception:  # noqa: BLE001 - the decode reports it
        return 0
    return 1 if mode in ("1", "L", "LA", "La", "F") or mode.startswith("I") else 3


class _ChannelMismatch(Exception):
    pass


def _write_chunk(f, chunk: np.ndarray) -> None:
    """Append ``chunk`` (contiguous) to the open images file (tests replace it to simulate a full disk)."""
    f.write(chunk.reshape(-1).data)


def _decode_stream(
    paths: Sequence[Path], res: int, channels: int, sink: Callable[[np.ndarray], None], desc: str
) -> tuple[list[int], list[tuple[int, BaseException]], bool]:
    """Decode ``paths`` in order with a thread pool, at most a small window in flight, and pass the
    images to ``sink`` in chunks of ``[k, channels, res, res]``. Returns ``(ok, errors, any_rgb)``
    (``errors``: position and exception)."""
    per_image = channels * res * res
    buf = np.empty((max(1, min(256, (8 << 20) // per_image)), channels, res, res), dtype=np.uint8)
    filled = 0
    ok: list[int] = []
    errors: list[tuple[int, BaseException]] = []
    any_rgb = False

    def one(p: Path) -> torch.Tensor | BaseException:
        try:
            return decode_image(p, res)
        except Exception as e:  # noqa: BLE001 - reported per file
            return e

    bar = None
    if len(paths) > PROGRESS_MIN_FILES and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr)
    threads = _num_threads()
    pending: deque[tuple[int, Future]] = deque()
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            nxt = 0
            while nxt < len(paths) or pending:
                while nxt < len(paths) and len(pending) < 4 * threads:
                    pending.append((nxt, pool.submit(one, paths[nxt])))
                    nxt += 1
                i, fut = pending.popleft()
                r = fut.result()
                if bar is not None:
                    bar.update(1)
                if isinstance(r, BaseException):
                    errors.append((i, r))
                    continue
                if r.shape[0] > channels:
                    for _, f in pending:
                        f.cancel()
                    raise _ChannelMismatch
                any_rgb = any_rgb or r.shape[0] == 3
                buf[filled] = r.numpy()  # a 1-channel image broadcasts to 3 channels in mixed data
                filled += 1
                ok.append(i)
                if filled == len(buf):
                    sink(buf)
                    filled = 0
            if filled:
                sink(buf[:filled])
    finally:
        if bar is not None:
            bar.close()
    return ok, errors, any_rgb


def _predict_channels(paths: Sequence[Path]) -> int:
    """3 as soon as a header says RGB (colour data: the first file), else 1 after reading them all."""
    with ThreadPoolExecutor(max_workers=_num_threads()) as pool:
        for i in range(0, len(paths), 64):
            if 3 in pool.map(_header_channels, paths[i : i + 64]):
                return 3
    return 1


def _decode_with_channels(
    paths: Sequence[Path],
    res: int,
    desc: str,
    predicted: int,
    sink_for: Callable[[int], Callable[[np.ndarray], None]],
) -> tuple[int, list[int], list[tuple[int, BaseException]]]:
    """Decode with the channel count the headers predict, again with the other one if they were wrong
    (a header-RGB file that fails to decode, or a format whose mode changes on load: rare)."""
    for channels in (predicted, 1 if predicted == 3 else 3):
        try:
            ok, errors, any_rgb = _decode_stream(paths, res, channels, sink_for(channels), desc)
        except _ChannelMismatch:
            continue
        if channels == 3 and not any_rgb:
            if ok:
                continue  # every decoded image was grayscale: the set keeps one channel
            return 1, ok, errors  # nothing written
        return channels, ok, errors
    raise AssertionError("unreachable: 1 then 3 channels, or 3 then 1")  # pragma: no cover


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _transient(e: BaseException) -> bool:
    """An OS error of the file itself (permission, missing, I/O), not of its content: not cached.

    Pillow reports bad content as OSError without an errno (truncated, unidentified)."""
    return isinstance(e, OSError) and e.errno is not None


def _decode_in_memory(paths: Sequence[Path], res: int, desc: str) -> Decoded:
    out: list[torch.Tensor] = []

    def sink_for(channels: int) -> Callable[[np.ndarray], None]:
        out[:] = [torch.empty((len(paths), channels, res, res), dtype=torch.uint8)]
        pos = [0]

        def sink(chunk: np.ndarray) -> None:
            out[0][pos[0] : pos[0] + len(chunk)] = torch.from_numpy(chunk)
            pos[0] += len(chunk)

        return sink

    channels, ok, errors = _decode_with_channels(paths, res, desc, _predict_channels(paths), sink_for)
    images = out[0][: len(ok)] if out else torch.zeros((0, channels, res, res), dtype=torch.uint8)
    if images.shape[1] != channels:  # nothing decoded at the predicted 3 channels
        images = torch.zeros((0, channels, res, res), dtype=torch.uint8)
    return Decoded(images, ok, [(paths[i], _message(e)) for i, e in errors], "decoded (not cached)")


def _human(n: int) -> str:
    x = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if x < 1024:
            return f"{x:.0f} {unit}" if unit == "bytes" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def _disk_error(cache_dir: Path, e: OSError, needed: int, n: int, res: int) -> DataError:
    why = e.strerror or str(e)
    return DataError(
        f"cannot write the decode cache in {cache_dir}: {why}. Decoding these {n} images at {res}x{res} "
        f"needs up to {needed} bytes ({_human(needed)}) there. Free space there, pass another folder "
        f"(--cache-dir DIR or RIFLE_CACHE_DIR=DIR), or decode into memory instead (--cache-dir off or "
        f"RIFLE_CACHE_DIR=off)."
    )


def _open_entry(entry: Path, key: str) -> Decoded | None:
    """The complete entry at ``entry`` (memory-mapped), or None when there is none or it is unusable."""
    meta_path = entry / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(int(s) for s in meta["shape"])
        if meta.get("key") != key or meta.get("format") != FORMAT or len(shape) != 4:
            raise ValueError("its key or format is not this one")
        size = int(np.prod(shape))
        if (entry / IMAGES).stat().st_size != size:
            raise ValueError(
                f"{IMAGES} holds {(entry / IMAGES).stat().st_size} bytes, the shape needs {size}"
            )
        if size:
            # read-only and shared: a private (copy-on-write) mapping would be charged in full against
            # the kernel's overcommit limit, refused for a file larger than RAM + swap
            arr = np.memmap(entry / IMAGES, dtype=np.uint8, mode="r", shape=shape)
            with warnings.catch_warnings():  # "not writable": never written (a write would fault)
                warnings.simplefilter("ignore", UserWarning)
                images = torch.from_numpy(arr)
        else:
            images = torch.zeros(shape, dtype=torch.uint8)
        failed = {int(i) for i, _ in meta["errors"]}
        ok = [i for i in range(int(meta["files"])) if i not in failed]
        if len(ok) != shape[0]:
            raise ValueError(f"{len(ok)} decoded files for {shape[0]} images")
        errors = [(Path(p), str(m)) for (_, m), p in zip(meta["errors"], meta["error_paths"])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring unusable decode cache entry {entry} ({e}); decoding again", stacklevel=4)
        return None
    try:
        os.utime(entry)  # "last used": `find DIR -maxdepth 1 -mtime +30` lists entries unused for 30 days
    except OSError:
        pass  # a read-only shared cache still serves
    return Decoded(images, ok, errors, "disk cache", entry)


def _temp_name(key: str) -> str:
    return f".tmp-{key[:16]}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_temps(cache_dir: Path, key: str) -> None:
    """Temporary folders of this key left by dead processes of this host (killed while writing)."""
    host = socket.gethostname()
    for d in cache_dir.glob(f".tmp-{key[:16]}-*"):
        try:
            rest, pid, _ = d.name.rsplit("-", 2)
            if rest != f".tmp-{key[:16]}-{host}" or int(pid) == os.getpid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            continue


class _Lock:
    """An exclusive ``flock`` on ``<cache dir>/.locks/<key>``, released when the process dies (no stale
    lock); when it cannot be taken (no fcntl, a read-only folder, a file system without locks) the
    writers race and the atomic rename keeps one complete entry."""

    def __init__(self, cache_dir: Path, key: str) -> None:
        self.fd: int | None = None
        if fcntl is None or not _USE_LOCK:
            return
        try:
            (cache_dir / ".locks").mkdir(parents=True, exist_ok=True)
            self.fd = os.open(cache_dir / ".locks" / key, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for another process decoding into {cache_dir / key} ...",
                file=sys.stderr,
                flush=True,
            )
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError:
                self.release()
        except OSError:
            self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_entry(
    paths: Sequence[Path], res: int, desc: str, cache_dir: Path, key: str, commit: bool
) -> Decoded:
    """Decode into a temporary folder in ``cache_dir`` and rename it to ``cache_dir/key`` (``commit``), or
    map the temporary file and delete it (its space is freed when the images are)."""
    n = len(paths)
    tmp = cache_dir / _temp_name(key)
    handle: list[IO[bytes]] = []

    def sink_for(channels: int) -> Callable[[np.ndarray], None]:
        for f in handle:
            f.close()
        f = open(tmp / IMAGES, "wb")  # noqa: SIM115 - closed below
        handle[:] = [f]
        return lambda chunk: _write_chunk(f, chunk)

    predicted = _predict_channels(paths)
    needed = n * predicted * res * res
    try:
        if shutil.disk_usage(cache_dir).free < needed:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (checked before decoding)")
        tmp.mkdir()
        channels, ok, errors = _decode_with_channels(paths, res, desc, predicted, sink_for)
        if not handle:  # pragma: no cover - the sink is always opened
            sink_for(channels)
        f = handle.pop()
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if os.path.getsize(tmp / IMAGES) != len(ok) * channels * res * res:  # 3 -> 1 with nothing decoded
            open(tmp / IMAGES, "wb").close()
        meta = {
            "format": FORMAT,
            "key": key,
            "shape": [len(ok), channels, res, res],
            "files": n,
            "errors": [[i, _message(e)] for i, e in errors],
            "error_paths": [str(paths[i]) for i, _ in errors],
            "decoder": DECODER_VERSION,
            "pillow": PIL.__version__,
            "channel_rule": CHANNEL_RULE,
            "first_file": os.path.abspath(paths[0]),
            "last_file": os.path.abspath(paths[-1]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "bytes": len(ok) * channels * res * res,
        }
        with open(tmp / META, "w") as mf:
            json.dump(meta, mf, indent=1)
            mf.flush()
            os.fsync(mf.fileno())
        _fsync_dir(tmp)
    except BaseException as e:
        for f in handle:
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _disk_error(cache_dir, e, needed, n, res) from e
        raise
    commit = commit and not any(_transient(e) for _, e in errors)
    entry = cache_dir / key
    if not commit:
        got = _open_entry(tmp, key)
        shutil.rmtree(tmp, ignore_errors=True)  # the mapping keeps the data until the images are freed
        if got is None:  # pragma: no cover - just written
            raise DataError(f"could not read back the decoded images from {tmp}")
        got.source, got.entry = "decoded (not cached)", None
        return got
    try:
        os.rename(tmp, entry)  # atomic; fails when another process's complete entry is there
        _fsync_dir(cache_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    got = _open_entry(entry, key)
    if got is None:  # pragma: no cover - a complete entry was just renamed into place
        raise DataError(f"the decode cache entry {entry} could not be read back after writing it")
    got.source = "decoded"
    return got


def decode_files(
    paths: Sequence[str | os.PathLike],
    res: int,
    *,
    desc: str = "decoding",
    cache_dir: str | os.PathLike | None = None,
) -> Decoded:
    """Decode ``paths`` (in order) with :func:`~rifle.data.decode.decode_image` at ``res x res``, through
    the decode cache (``cache_dir``: see :func:`resolve_cache_dir`; ``"off"`` decodes into memory).

    The set is 3-channel if any decoded image is RGB (1-channel images are broadcast), else 1-channel.
    Unreadable files do not raise: they are in ``errors`` and left out of ``images`` / ``ok``. Decoding
    streams (RAM bounded by a small window, not by the dataset). Raises :class:`DataError` when the
    cache folder cannot be written (a full disk), naming the folder, the bytes needed and the fix.
    Pass every split of a dataset in one call: one entry, one channel rule; :meth:`Decoded.rows` cuts
    a split out.
    """
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise ValueError(f"res must be a positive integer, got {res!r}")
    files = [Path(p) for p in paths]
    root = resolve_cache_dir(cache_dir)
    if root is None or not files:
        return _decode_in_memory(files, res, desc)
    key, racy = _stat_key(files, res)
    entry = root / key
    got = _open_entry(entry, key)
    if got is not None:
        return got
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(root, e, 3 * len(files) * res * res, len(files), res) from e
    lock = _Lock(root, key)
    try:
        got = _open_entry(entry, key)  # written while this process waited for the lock
        if got is not None:
            return got
        _remove_stale_temps(root, key)
        if entry.exists():  # unusable (warned above): move it away, readers keep their mapping
            trash = root / _temp_name(key)
            try:
                os.rename(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass
        return _write_entry(files, res, desc, root, key, commit=not racy)
    finally:
        lock.release()
