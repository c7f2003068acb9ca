"""Checkpoints that are atomic and never unpickled.

``checkpoint.safetensors`` holds the model weights (safetensors, metadata: epoch, model, classes);
``state.pt`` holds the resumable state (optimizer, scheduler, methods, metrics) saved with
``torch.save`` and read back with ``torch.load(..., weights_only=True)``. Each file is written to a
temporary name and renamed into place, so a crash leaves the last good checkpoint; both record the
epoch and a mismatched pair is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "checkpoint.safetensors"
STATE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and which file."""


def atomic_write(path: Path, write: callable) -> None:
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


def save_checkpoint(out_dir: Path, model: nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    epoch = str(state["epoch"])
    metadata = {"epoch": epoch, **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(model_tensors(model), tmp, metadata=metadata))
    atomic_write(out_dir / STATE, lambda tmp: torch.save(state, tmp))


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_checkpoint(out_dir: Path, model: nn.Module, meta: dict[str, Any],
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights into ``model`` and return the resumable state; raise ``CheckpointError`` clearly."""
    out_dir = Path(out_dir)
    wpath, spath = out_dir / WEIGHTS, out_dir / STATE
    for p in (wpath, spath):
        if not p.is_file():
            raise CheckpointError(f"cannot resume: {p} is missing")
    try:
        saved_meta = read_metadata(wpath)
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {wpath}: {e}") from None
    for key, value in meta.items():
        if key in saved_meta and json.loads(saved_meta[key]) != value:
            raise CheckpointError(f"{wpath} was saved for {key}={json.loads(saved_meta[key])!r}, this run "
                                  f"has {key}={value!r}")
    try:
        state = torch.load(spath, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corruption
        raise CheckpointError(f"cannot read {spath} (weights-only load): {e}") from None
    if str(state.get("epoch")) != saved_meta.get("epoch"):
        raise CheckpointError(f"{wpath} (epoch {saved_meta.get('epoch')}) and {spath} (epoch "
                              f"{state.get('epoch')}) do not belong together; the run was interrupted "
                              f"while saving - delete both to restart")
    load_weights(model, tensors, str(wpath))
    return state


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model) {shapes[:3]}")
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{source} does not fit this model (another model or class count?): "
                              + "; ".join(parts))
    model.load_state_dict(tensors)
