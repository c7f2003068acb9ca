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

    def metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@dataclass
class Collected:
    runs: list[RunRecord] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _identity(path: Path, root: Path, config: dict[str, Any]) -> tuple[str, str, float, str, int] | None:
    g = (config.get("extra") or {}).get("grid")
    parts = path.relative_to(root).parts
    label = parts[-2] if len(parts) >= 2 else config.get("method", "?")
    if isinstance(g, dict) and {"label", "dataset", "model", "train_fraction", "seed"} <= set(g):
        return str(g["dataset"]), str(g["model"]), float(g["train_fraction"]), str(g["label"]), int(g["seed"])
    if len(parts) >= 5 and parts[-3].startswith("frac") and parts[-1].startswith("seed"):
        try:
            return parts[-5], parts[-4], float(parts[-3][4:]), label, int(parts[-1][4:])
        except ValueError:
            pass
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
    out = Collected()
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
        }
    except Exception as e:  # noqa: BLE001 - a report must still come out of a folder with an odd grid
        return {"error": f"{type(e).__name__}: {e}"}


def _source_line(p: Path) -> str | None:
    first = p.read_text().splitlines()[:1]
    m = re.match(r"# copied by `rifle bench` from (.*)", first[0]) if first else None
    return m.group(1) if m else None
