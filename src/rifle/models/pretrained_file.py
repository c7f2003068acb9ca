"""Pretrained weights from a file the user has (``--pretrained-file``): safetensors or a weights-only
torch file, loaded into the backbone by name; the classifier's tensors are dropped (the run trains a new
head). A missing, mismatched or unexpected tensor is an error naming the file and the tensors.

Unwrapping and timm's ``checkpoint_filter_fn`` follow timm's own ``load_checkpoint``
(timm/models/_helpers.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.structure import find_head, head_names, in_head
from .common import ModelError

# checkpoint dicts that wrap the state dict, in the order timm's load_state_dict prefers them (EMA first)
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_MAX_LISTED = 6


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors by name, where they were in the file)`` from a safetensors file or a torch file read with
    ``torch.load(weights_only=True)`` (never unpickling objects); a checkpoint dict wrapping the state dict
    (``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``, as timm) is unwrapped, and ``module.`` /
    ``_orig_mod.`` prefixes are removed. Raises :class:`ModelError` naming the file."""
    p = Path(path).expanduser()
    flag = f"--pretrained-file {p}"
    if not p.is_file():
        raise ModelError(f"{flag}: no such file" if not p.exists() else f"{flag}: not a file")
    with open(p, "rb") as f:
        magic = f.read(4)
    torch_format = magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80"  # torch.save's zip, or a legacy pickle
    if not torch_format:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(
                f"{flag}: neither a safetensors file nor a torch file, or corrupt (safetensors: {e})"
            ) from None
        where = "safetensors"
    else:
        import pickle

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"{flag}: torch.load(weights_only=True) refused it (it holds Python objects "
                f"other than tensors, which are never unpickled here); save the weights alone: "
                f"torch.save(model.state_dict(), PATH) or safetensors.torch.save_file "
                f"[{first}]"
            ) from None
        except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle opcode, ...
            raise ModelError(
                f"{flag}: not a readable torch file (truncated or corrupt?) [{type(e).__name__}: {e}]"
            ) from None
        where = "torch file"
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj, where = obj[key], f"{where}, ['{key}']"
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelError(
            f"{flag}: expected a state dict (tensors by parameter name), found "
            f"{'an empty dict' if isinstance(obj, dict) else type(obj).__name__}"
        )
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ModelError(
                f"{flag}: expected a state dict (tensors by parameter name), but entry {k!r} is a "
                f"{type(v).__name__} (top-level keys: {_listed([str(x) for x in obj])})"
            )
        k = str(k)
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        state[k] = v
    return state, where


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file's bytes (hex): a run records it to tell on ``--resume`` if the file changed."""
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _head_prefixes(model: nn.Module) -> list[str]:
    """Dotted names of the classifier(s) whose tensors a file must not overwrite (the run's new head)."""
    names = set()
    try:
        names.update(head_names(model, find_head(model)))
    except ValueError:
        pass
    cfg = getattr(model, "pretrained_cfg", None) or {}
    clf = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    names.update([clf] if isinstance(clf, str) else list(clf or ()))
    for aux in ("AuxLogits.fc", "aux1.fc2", "aux2.fc2"):  # torchvision's auxiliary heads (replaced too)
        with contextlib.suppress(AttributeError):
            model.get_submodule(aux)
            names.add(aux)
    return sorted(names)


def _timm_filter(model: nn.Module) -> Callable | None:
    """The ``checkpoint_filter_fn`` timm applies to this architecture's pretrained files, if any."""
    module = sys.modules.get(type(model).__module__)
    if module is None or not module.__name__.startswith("timm."):
        return None
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def load_pretrained_file(
    model: nn.Module,
    path: str | os.PathLike,
    name: str,
    read: tuple[dict[str, torch.Tensor], str] | None = None,
) -> str:
    """Load the file's tensors into every tensor of ``model`` except its classifier head; returns a report.

    timm models get timm's own ``checkpoint_filter_fn`` first (as ``timm.create_model`` would for its
    weights: e.g. original-format keys, position-embedding resize). The classifier's tensors in the file
    are dropped (the head stays as drawn: the run trains a new one). Every other tensor must match by name
    and shape (BatchNorm's ``num_batches_tracked`` counters excepted); otherwise :class:`ModelError` names
    the file and the tensors. ``read``: what :func:`read_state_dict` returned for ``path``, if at hand.
    """
    p = Path(path).expanduser()
    state, where = read if read is not None else read_state_dict(p)
    flag = f"--pretrained-file {p}"
    fn = _timm_filter(model)
    if fn is not None:
        try:
            state = fn(state, model)
        except Exception as e:  # noqa: BLE001 - the filter indexes keys it expects
            raise ModelError(
                f"{flag}: timm's checkpoint filter for {name} failed on it (is it a state "
                f"dict of {name}?) [{type(e).__name__}: {e}]"
            ) from None
    heads = _head_prefixes(model)
    dropped = sorted(k for k in state if in_head(k, heads))
    state = {k: v for k, v in state.items() if not in_head(k, heads)}
    own = model.state_dict()
    counter = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
    expected = [k for k in own if not in_head(k, heads)]
    missing = [k for k in expected if k not in state and not counter(k)]
    unexpected = [k for k in state if k not in own and not counter(k)]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        if not any(k in own for k in state):
            detail = (
                f"none of the file's {len(state)} tensor names is one of {name}'s (file: "
                f"{_listed([k for k in state if not counter(k)])}; model: "
                f"{_listed([k for k in expected if not counter(k)])})"
            )
        else:
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} of the model's {len(expected)} backbone tensors are not in the "
                    f"file: {_listed(missing)}"
                )
            if unexpected:
                parts.append(
                    f"{len(unexpected)} tensors of the file are not in the model: {_listed(unexpected)}"
                )
            if shapes:
                parts.append(f"{len(shapes)} have other shapes: {_listed(shapes)}")
            detail = "; ".join(parts)
        raise ModelError(
            f"{flag} does not match {name}: {detail}. Is it a state dict of {name} (a file "
            f"of another architecture or variant does not load)?"
        )
    loaded = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    head_text = (
        f"its classifier ({_listed(dropped)}) is not loaded: the run trains a new head"
        if dropped
        else "it has no classifier tensors"
    )
    return f"{len(loaded)} tensors from {p} ({where}) into the backbone; {head_text}"
