"""Checkpoints that are atomic and never unpickled.

``checkpoint.safetensors`` holds the weights (with a checksum verified on every load), ``state.pt`` the
resumable state, read back with ``torch.load(..., weights_only=True)``; both are written to a temporary
name and renamed into place, and an interrupt waits for both. See docs/guide.md ("Interruptions and
checkpoints").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "checkpoint.safetensors"
STATE = "state.pt"
CHECKSUM_KEY = "sha256"  # safetensors metadata key: JSON string, weights_checksum() of the tensors
STATE_KEYS = ("epoch", "optimizer", "scheduler", "methods", "history")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and which file."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, Kubernetes, ``kill``) turned into an exception by ``rifle``'s handler; handled like
    Ctrl-C (a ``KeyboardInterrupt``), exit status 143."""


@contextlib.contextmanager
def defer_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the body runs and deliver them (once each) when it is done.

    Only on the main thread (the only one Python delivers signals to); ignored signals stay ignored. A
    signal's previous disposition is restored before it is re-raised (a Python handler is called, SIG_DFL
    re-raised), so the default SIGTERM action still ends the process with status 143 - after the body.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}
    for s in signums:
        handler = signal.getsignal(s)
        if handler in (signal.SIG_IGN, None):  # ignored, or installed outside Python: leave alone
            continue
        previous[s] = handler
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # A Python handler is called here, as the signal would call it: a signal raised again would stay
        # pending in a thread that blocks it (Ray's workers block SIGINT: a ray.cancel held here was lost)
        for s in dict.fromkeys(pending):
            if callable(previous[s]):
                previous[s](s, None)
            else:
                signal.raise_signal(s)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same folder, atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of the state dict (what safetensors needs)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def weights_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the tensors in name order: ``[name, dtype, shape]`` as JSON, then the raw bytes.

    Independent of the file layout, so it is computed before saving and checked on the loaded tensors.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor (in the mapping's order) holding a NaN or an inf."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def non_finite_error(out_dir: Path, epoch: int | str, bad: str) -> CheckpointError:
    """The refusal to save weights whose tensor ``bad`` holds a NaN or an inf."""
    out_dir = Path(out_dir)
    kept = read_metadata(out_dir / WEIGHTS).get("epoch") if (out_dir / WEIGHTS).is_file() else None
    return CheckpointError(
        f"the weights after epoch {epoch} are non-finite (tensor {bad!r} holds NaN or "
        f"inf): training diverged, so they are not saved. The last good checkpoint in "
        f"{out_dir} is kept ({f'epoch {kept}' if kept else 'none yet'}); try a "
        f"lower --lr"
    )


def save_checkpoint(out_dir: Path, model: nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write both files atomically; SIGINT/SIGTERM are held until both are in place."""
    out_dir = Path(out_dir)
    epoch = str(state["epoch"])
    tensors = model_tensors(model)
    bad = first_non_finite(tensors)
    if bad is not None:
        raise non_finite_error(out_dir, epoch, bad)
    metadata = {
        "epoch": epoch,
        **{k: json.dumps(v) for k, v in meta.items()},
        CHECKSUM_KEY: json.dumps(weights_checksum(tensors)),
    }
    with defer_signals():
        atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        atomic_write(out_dir / STATE, lambda tmp: torch.save(state, tmp))


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_weights(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a weights file, its checksum verified; ``CheckpointError`` names the file.

    Files written before checksums existed (no ``sha256`` in the metadata) are accepted unverified.
    """
    path = Path(path)
    try:
        meta = read_metadata(path)
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, header errors
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if CHECKSUM_KEY in meta:
        try:
            expected = json.loads(meta[CHECKSUM_KEY])
        except ValueError:
            expected = meta[CHECKSUM_KEY]
        actual = weights_checksum(tensors)
        if actual != expected:
            raise CheckpointError(
                f"{path} is corrupted: the checksum of its tensors (sha256 {actual[:16]}...) "
                f"differs from the one stored when it was saved ({str(expected)[:16]}...). "
                f"Restore the file from a backup or train the run again"
            )
    return meta, tensors


def _state_problem(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in rifle's words (never torch's advice)."""
    if isinstance(e, pickle.UnpicklingError):
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if m:
            return f"it holds an object of type {m.group(1)}, which a rifle state file never contains"
        return "its pickled data is malformed or uses constructs a state file never contains"
    if isinstance(e, EOFError):
        return "the file is empty or truncated"
    return "it is not a file written by torch.save (damaged, truncated or another format)"


def read_state(spath: Path, wpath: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` weights-only; anything else is refused with what to do about it."""
    todo = (
        f"It was not written by `rifle train` or is damaged. rifle reads state files weights-only and "
        f"never unpickles other objects. Restore it from a backup, or delete {spath} and {wpath} to "
        f"train the run from the start"
    )
    try:
        with warnings.catch_warnings():  # torch's warnings about the file's pickle protocol: ours says it
            warnings.simplefilter("ignore")
            state = torch.load(spath, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corruption
        raise CheckpointError(
            f"{spath} is not a valid rifle state file: {_state_problem(e)}. {todo}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{spath} is not a valid rifle state file: it holds a "
            f"{type(state).__name__}, not the dict of a state file. {todo}"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{spath} is not a valid rifle state file: it lacks {', '.join(missing)}. {todo}"
        )
    return state


def load_checkpoint(
    out_dir: Path, model: nn.Module, meta: dict[str, Any], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load weights into ``model`` and return the resumable state; raise ``CheckpointError`` clearly."""
    out_dir = Path(out_dir)
    wpath, spath = out_dir / WEIGHTS, out_dir / STATE
    for p in (wpath, spath):
        if not p.is_file():
            raise CheckpointError(f"cannot resume: {p} is missing")
    saved_meta, tensors = read_weights(wpath)
    for key, value in meta.items():
        if key in saved_meta and json.loads(saved_meta[key]) != value:
            raise CheckpointError(
                f"{wpath} was saved for {key}={json.loads(saved_meta[key])!r}, this run has {key}={value!r}"
            )
    state = read_state(spath, wpath, map_location)
    if str(state.get("epoch")) != saved_meta.get("epoch"):
        raise CheckpointError(
            f"{wpath} (epoch {saved_meta.get('epoch')}) and {spath} (epoch "
            f"{state.get('epoch')}) do not belong together; the run was interrupted "
            f"while saving - delete both to restart"
        )
    load_weights(model, tensors, str(wpath))
    return state


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; refuse ones that do not fit or are not finite (naming ``source``)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model) {shapes[:3]}")
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(
            f"{source} does not fit this model (another model or class count?): " + "; ".join(parts)
        )
    check_finite(tensors, source, order=own)
    model.load_state_dict(tensors)


def check_finite(
    tensors: Mapping[str, torch.Tensor], source: str, order: Iterable[str] | None = None
) -> None:
    """Raise ``CheckpointError`` naming ``source`` and the first tensor (in ``order``) holding NaN or inf."""
    keys = [k for k in order if k in tensors] if order is not None else list(tensors)
    bad = first_non_finite({k: tensors[k] for k in keys})
    if bad is not None:
        raise CheckpointError(
            f"{source} holds non-finite weights (NaN or inf), first in tensor {bad!r}: the "
            f"run diverged before this checkpoint was saved, so it cannot predict anything. "
            f"Train it again (e.g. with a lower --lr)"
        )
