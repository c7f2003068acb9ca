"""A finished run's folder for the analyses: its config and label, the model rebuilt as training
started (:func:`build_reference`) or with its final checkpoint, and the depth profile from it
(:func:`run_depth`, ``depth.json``) or from ``depth.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..build import blank_model, build_methods, initial_model
from ..config import from_dict
from ..core.structure import in_head
from .depth import DEPTH_JSON, layer_profile, read_monitor, tracked_layers


def _read_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run folder?)")
    return yaml.safe_load(p.read_text()) or {}


def run_label(run_dir: str | Path, config: dict[str, Any] | None = None) -> str:
    config = config if config is not None else _read_config(Path(run_dir))
    g = (config.get("extra") or {}).get("grid")
    if isinstance(g, dict) and "label" in g:
        return f"{g['label']} s{g.get('seed', config.get('seed'))}"
    return f"{config.get('method', '?')} ({Path(run_dir).name})"


def _read_checkpoint(
    run_dir: str | Path,
) -> tuple[Path, dict[str, Any], Path, dict[str, str], dict[str, torch.Tensor]]:
    """``(run folder, config, checkpoint path, raw metadata, tensors)`` of a run's final checkpoint."""
    from ..train.checkpoint import WEIGHTS, read_weights

    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    wpath = run_dir / WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS} (the run has not finished an epoch)")
    meta, tensors = read_weights(wpath)  # checksum verified
    return run_dir, config, wpath, meta, tensors


class ReferenceError(ValueError):
    """The run's pretrained reference cannot be rebuilt as it was (its --pretrained-file changed)."""


def check_reference_file(run_dir: str | Path, config: dict[str, Any]) -> None:
    """Refuse to rebuild a run's starting model from a ``--pretrained-file`` whose bytes are not the ones
    the run recorded (``pretrained_file.json``): the reference would silently be another model."""
    from ..models import file_sha256
    from ..train.outputs import PRETRAINED

    record_path = Path(run_dir) / PRETRAINED
    if not config.get("pretrained_file") or not record_path.is_file():
        return
    record = json.loads(record_path.read_text())
    path = Path(record.get("path") or config["pretrained_file"]).expanduser()  # where a resume moved it
    if not path.is_file():
        raise ReferenceError(
            f"{run_dir}: the run's reference model is built from --pretrained-file {path}, and there is no "
            f"file there (the run recorded sha256 {record.get('sha256')}); put it back to analyse this run"
        )
    now = file_sha256(path)
    if record.get("sha256") and now != record["sha256"]:
        raise ReferenceError(
            f"{run_dir}: --pretrained-file {path} is not the file the run started from (sha256 {now}, the "
            f"run recorded {record['sha256']}): its reference model would be another one; restore the file"
        )


def build_reference(config: dict[str, Any], num_classes: int) -> nn.Module:
    """The model exactly as ``run_train`` built it before training (pretrained backbone, first head)."""
    cfg = from_dict(config)
    methods = build_methods(cfg)
    with torch.random.fork_rng(devices=[]):
        return initial_model(cfg, num_classes, methods)


def load_run_model(
    run_dir: str | Path, *, pretrained: bool = False
) -> tuple[nn.Module, dict[str, Any], dict]:
    """``(model with the final checkpoint's weights, config, checkpoint metadata)``."""
    from ..train.checkpoint import load_weights

    run_dir, config, wpath, raw_meta, tensors = _read_checkpoint(run_dir)
    meta: dict[str, Any] = {k: (json.loads(v) if k != "epoch" else int(v)) for k, v in raw_meta.items()}
    n = int(meta.get("num_classes") or len(meta.get("classes") or []))
    if pretrained:
        check_reference_file(run_dir, config)
        model = build_reference(config, n)
    else:
        model = blank_model(from_dict(config), n)
    load_weights(model, tensors, str(wpath))
    return model, config, meta


def run_depth(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """Per-layer relative weight change of a run's final checkpoint; writes ``depth.json``."""
    from ..core.structure import find_head, head_names
    from ..train.checkpoint import check_finite

    run_dir, config, wpath, meta, tensors = _read_checkpoint(run_dir)
    n = int(json.loads(meta["num_classes"])) if "num_classes" in meta else len(json.loads(meta["classes"]))
    check_reference_file(run_dir, config)
    reference = build_reference(config, n)
    heads = head_names(
        reference, find_head(reference, config["head"].split(",") if config.get("head") else None)
    )
    layers = tracked_layers(reference)
    names = [n for n, _ in layers]
    ref_state = reference.state_dict()
    check_finite(tensors, str(wpath), order=ref_state)
    r = layer_profile(tensors, ref_state, names)
    out = {
        "run": str(run_dir),
        "label": run_label(run_dir, config),
        "model": config.get("model"),
        "method": config.get("method"),
        "epoch": int(meta.get("epoch", -1)),
        "reference": "pretrained backbone + the run's first head init",
        "layers": [
            {
                "index": i,
                "name": name,
                "kind": kind,
                "numel": int(ref_state[name].numel()),
                "rel_change": v,
                "head": in_head(name, heads),
            }
            for i, ((name, kind), v) in enumerate(zip(layers, r))
        ],
    }
    if write:
        from ..train.checkpoint import atomic_write_text

        atomic_write_text(run_dir / DEPTH_JSON, json.dumps(out, indent=1) + "\n")
    return out


def monitor_depth(run_dir: str | Path, mon: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`run_depth`'s result from the run's ``depth.jsonl`` (its last recorded epoch), no
    checkpoint needed."""
    mon = mon if mon is not None else read_monitor(run_dir)
    if not mon or not mon.get("header") or not mon.get("weights"):
        return None
    h, last = mon["header"], mon["weights"][-1]
    return {
        "run": str(run_dir),
        "label": run_label(run_dir),
        "method": h.get("method"),
        "epoch": last["epoch"],
        "reference": "pretrained backbone + the run's first head init (depth.jsonl)",
        "layers": [
            {"index": i, "name": n, "kind": k, "numel": int(c), "rel_change": v, "head": hd}
            for i, (n, k, c, v, hd) in enumerate(
                zip(h["names"], h["kinds"], h["numel"], last["rel_change"], h["head"])
            )
        ],
    }


def load_profile(run_dir: str | Path, mon: dict[str, Any] | None = None) -> list[float] | None:
    """The final per-layer relative change: ``depth.json`` if written, else the monitor's last epoch
    (``mon``: the run's :func:`read_monitor` result when already read)."""
    p = Path(run_dir) / DEPTH_JSON
    if p.is_file():
        return [layer["rel_change"] for layer in json.loads(p.read_text())["layers"]]
    mon = mon if mon is not None else read_monitor(run_dir)
    if mon and mon["weights"]:
        return list(mon["weights"][-1]["rel_change"])
    return None
