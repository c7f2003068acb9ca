"""The runs of a grid folder, for ``rifle report``: every run folder below it, its identity (dataset,
model, train fraction, label, seed) and whether it completed; and the grid it was run with.
See docs/experiments.md, "The report"."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .grid import GRID_FILE, parse_grid


@dataclass
class RunRecord:
    dataset: str
    model: str
    fraction: float
    label: str
    seed: int
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def cell(self) -> tuple[str, str, float]:
        return (self.dataset, self.model, self.fraction)

    def predictions(self) -> dict[str, Any] | None:
        """``predictions.npz``'s arrays (``test_final``, ``test_best_val``, ``test_labels`` and, with a
        validation split, ``val_*``), or None when the run has none (runs older than the file)."""
        if not hasattr(self, "_predictions"):
            self._predictions = read_predictions(self.path)
        return self._predictions

    def metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


PREDICTIONS = "predictions.npz"


def read_predictions(path: Path) -> dict[str, Any] | None:
    """The arrays of ``path/predictions.npz`` by name; None without the file."""
    import numpy as np

    p = Path(path) / PREDICTIONS
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def path_identity(rel: str) -> tuple[str, str, float, str, int] | None:
    """``(dataset, model, fraction, label, seed)`` from a grid path ``D/M/fracF/LABEL/seedS``."""
    parts = Path(rel).parts
    if len(parts) >= 5 and parts[-3].startswith("frac") and parts[-1].startswith("seed"):
        try:
            return parts[-5], parts[-4], float(parts[-3][4:]), parts[-2], int(parts[-1][4:])
        except ValueError:
            return None
    return None


def steps_after_reinits(summary: dict[str, Any], config: dict[str, Any]) -> list[int] | None:
    """Optimizer steps after each re-init of a RIFLE run until the next one or the end, recomputed from
    the recorded config and split size by the rule of the run's ``--min-steps-after`` warning
    (:func:`rifle.core.schedule.steps_after`; runs record the warning nowhere). None when not a RIFLE run
    or when the numbers it needs are not recorded."""
    from ..core.schedule import default_guard, make_schedule, steps_after
    from ..data.cache import last_batch_dropped, num_batches, samples_per_rank

    rc = (summary.get("methods") or {}).get("rifle") or (config.get("resolved_methods") or {}).get("rifle")
    try:
        n_train = int(summary["data_info"]["sizes"]["train"])
        batch, epochs = int(config["batch_size"]), int(config["epochs"])
        accum = int(config.get("grad_accum") or 1)
        world = int(config.get("world_size") or (summary.get("ddp") or {}).get("world_size") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(rc, dict) or n_train < 1 or batch < 1 or epochs < 1:
        return None
    n_rank, local = samples_per_rank(n_train, world), max(1, batch // world)
    spe = num_batches(n_rank, local, drop_last=last_batch_dropped(n_rank, local, accum))
    if rc.get("granularity") == "step":
        total = epochs * spe
        guard = rc.get("guard")
        if rc.get("guard_steps") is not None:
            guard = max(default_guard(total) if guard is None else guard, int(rc["guard_steps"]))
        try:
            sched = make_schedule(total, int(rc.get("reinits", 0)), guard, unit="step", warn=False)
        except (TypeError, ValueError):
            return None
        return steps_after(sched, 1)
    points = summary.get("reinit_epochs_seen")
    if points is None:
        points = summary.get("reinit_epochs") or []
    points = sorted(int(p) for p in points)
    ends = [*points[1:], epochs]
    return [(end - p) * spe for p, end in zip(points, ends)]


@dataclass
class Collected:
    runs: list[RunRecord] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    root: Path | None = None


def _identity(path: Path, root: Path, config: dict[str, Any]) -> tuple[str, str, float, str, int] | None:
    g = (config.get("extra") or {}).get("grid")
    parts = path.relative_to(root).parts
    label = parts[-2] if len(parts) >= 2 else config.get("method", "?")
    if isinstance(g, dict) and {"label", "dataset", "model", "train_fraction", "seed"} <= set(g):
        return str(g["dataset"]), str(g["model"]), float(g["train_fraction"]), str(g["label"]), int(g["seed"])
    ident = path_identity(str(path.relative_to(root)))
    if ident is not None:
        return ident
    if config:
        return (
            str(config.get("data")),
            str(config.get("model")),
            float(config.get("train_fraction", 1.0)),
            label,
            int(config.get("seed", 0)),
        )
    return None


def collect(root: str | Path) -> Collected:
    """Every run folder under ``root`` (complete ones in ``runs``, the rest listed)."""
    root = Path(root)
    out = Collected(root=root)
    folders = sorted(
        {p.parent for name in ("summary.json", "config.yaml", "error.txt") for p in root.rglob(name)}
    )
    for folder in folders:
        rel = str(folder.relative_to(root))
        summary = None
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            pass
        if (folder / "error.txt").is_file() and not (summary or {}).get("complete"):
            out.failed[rel] = (folder / "error.txt").read_text().splitlines()[0][:200]
            continue
        if not summary or not summary.get("complete"):
            out.unfinished.append(rel)
            continue
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        ident = _identity(folder, root, config)
        if ident is None:
            out.unfinished.append(rel)
            continue
        out.runs.append(RunRecord(*ident, path=folder, summary=summary, config=config))
    return out


def grid_info(root: Path) -> dict[str, Any]:
    """What ``root/grid.yaml`` says (labels in order, baseline, seeds, ``train:``, the file it was copied
    from): ``{}`` without one, ``{"error": ...}`` when it does not parse."""
    p = root / GRID_FILE
    if not p.is_file():
        return {}
    try:
        spec = yaml.safe_load(p.read_text()) or {}
        grid = parse_grid(spec, source=str(p))
        return {
            "spec": spec,
            "labels": [e.label for e in grid.methods],
            "baseline": grid.baseline,
            "seeds": grid.seeds,
            "train": grid.train,
            "source": _source_line(p),
            "reference": grid.reference,
            "dataset_keys": {e.name: e.key for e in grid.entries()},
        }
    except Exception as e:  # noqa: BLE001 - a report must still come out of a folder with an odd grid
        return {"error": f"{type(e).__name__}: {e}"}


def _source_line(p: Path) -> str | None:
    first = p.read_text().splitlines()[:1]
    m = re.match(r"# copied by `rifle bench` from (.*)", first[0]) if first else None
    return m.group(1) if m else None
