"""A run's folder: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, the checkpoint files and, as
``--log-to`` chooses, ``metrics.csv`` and TensorBoard events in ``tb/`` (:mod:`rifle.train.loggers`).

``metrics.jsonl`` (and ``metrics.csv``) are rewritten atomically after every epoch from the in-memory
history, so they never hold an epoch twice, also after a resume.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import STATE, WEIGHTS, atomic_write_text
from .loggers import CSV, TB_DIR, TensorBoardLog, csv_text, parse_kinds

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FINGERPRINT = "data_fingerprint.json"
PROGRESS_FILES = (METRICS, SUMMARY, WEIGHTS, STATE)  # written once an epoch has been trained
RUN_FILES = (CONFIG, FINGERPRINT, CSV, *PROGRESS_FILES)


class RunDirError(RuntimeError):
    """The output folder cannot be used as asked (holds another run, nothing to resume, ...)."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    def __init__(self, path: str | Path, log: str | tuple[str, ...] | None = ("jsonl",)) -> None:
        """``log``: the writers of :meth:`write_metrics` / :meth:`write_summary` (``--log-to``: ``jsonl``
        always; ``csv``, ``tensorboard``; ``auto`` or None = csv, and tensorboard when installed)."""
        self.path = Path(path)
        self.log = parse_kinds(log)
        self._tb = TensorBoardLog(self.path / TB_DIR) if "tensorboard" in self.log else None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def holds_run(self) -> bool:
        """True once the run has trained an epoch (a folder with only ``config.yaml`` holds none)."""
        return any((self.path / f).exists() for f in PROGRESS_FILES)

    def read_config(self) -> dict[str, Any] | None:
        p = self.path / CONFIG
        if not p.is_file():
            return None
        values = yaml.safe_load(p.read_text())
        if not isinstance(values, dict):
            raise RunDirError(f"{p}: not a run's config (expected a mapping of settings)")
        return values

    def prepare(self, config: dict[str, Any], *, resume: bool, overwrite: bool,
                fingerprint: dict[str, Any] | None = None) -> bool:
        """Create or check the folder. Returns True when there is a checkpoint to resume from.

        A folder whose run never finished an epoch (it failed while loading data or building the model)
        is reused without ``--overwrite``. On ``--resume`` the config and the data ``fingerprint`` must
        match the ones recorded.
        """
        from ..config import diff_configs, format_diff
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path}: exists and is not a folder")
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; choose one")
        if overwrite or not self.holds_run():
            for f in RUN_FILES:
                (self.path / f).unlink(missing_ok=True)
            shutil.rmtree(self.path / TB_DIR, ignore_errors=True)
        elif not resume:
            raise RunDirError(f"--out {self.path} already holds a run; pass --resume to continue "
                              f"it, --overwrite to replace it, or another --out for a new run")
        else:
            saved = self.read_config()
            if saved is not None:
                diff = diff_configs(saved, config)
                if diff:
                    raise RunDirError(f"--resume with a changed config in {self.path / CONFIG}: "
                                      f"{format_diff(diff)}. Resume with the original settings or start "
                                      f"a new --out")
            if fingerprint is not None and (self.path / FINGERPRINT).is_file():
                from ..data import compare_fingerprints
                change = compare_fingerprints(json.loads((self.path / FINGERPRINT).read_text()), fingerprint)
                if change:
                    raise RunDirError(f"--resume refused: {change}. Resuming would re-carve the validation "
                                      f"split, which could then hold images the run trained on. Restore "
                                      f"the data, or start a new run (another --out, or --overwrite)")
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        if fingerprint is not None and not (self.path / FINGERPRINT).is_file():
            atomic_write_text(self.path / FINGERPRINT, json.dumps(fingerprint) + "\n")
        return resume and (self.path / STATE).is_file() and (self.path / WEIGHTS).is_file()

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows)
        atomic_write_text(self.path / METRICS, text)
        if "csv" in self.log:
            atomic_write_text(self.path / CSV, csv_text(rows))
        else:  # a metrics.csv left by an earlier --log-to would disagree with metrics.jsonl
            (self.path / CSV).unlink(missing_ok=True)
        if self._tb is not None:
            self._tb.write_rows(rows)

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.path / METRICS
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY, json.dumps({k: _clean(v) for k, v in summary.items()},
                                                         indent=2) + "\n")
        if self._tb is not None:
            self._tb.write_summary(summary)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (each epoch is flushed as it is written)."""
        if self._tb is not None:
            self._tb.close()

    def read_summary(self) -> dict[str, Any] | None:
        p = self.path / SUMMARY
        return json.loads(p.read_text()) if p.is_file() else None


def versions() -> dict[str, str]:
    import platform

    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "numpy", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    from .. import __version__
    out["rifle"] = __version__
    return out


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git, no repo
        return None
