"""A run's folder: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``predictions.npz``, the checkpoint
files and, as ``--log-to`` chooses, ``metrics.csv`` and TensorBoard events in ``tb/``
(:mod:`rifle.train.loggers`).

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

from .checkpoint import STATE, WEIGHTS, atomic_write, atomic_write_text
from .loggers import CSV, TB_DIR, TensorBoardLog, csv_text, parse_kinds

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FINGERPRINT = "data_fingerprint.json"
PRETRAINED = "pretrained_file.json"  # --pretrained-file's path and SHA-256, checked on --resume
PREDICTIONS = "predictions.npz"  # per-image predicted classes (Trainer.predictions), written at the end
PROGRESS_FILES = (METRICS, SUMMARY, WEIGHTS, STATE)  # written once an epoch has been trained
RUN_FILES = (CONFIG, FINGERPRINT, PRETRAINED, CSV, PREDICTIONS, *PROGRESS_FILES)


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

    def prepare(
        self,
        config: dict[str, Any],
        *,
        resume: bool,
        overwrite: bool,
        fingerprint: dict[str, Any] | None = None,
        pretrained: dict[str, Any] | None = None,
        pretrained_needed_by: tuple[str, ...] = (),
    ) -> bool:
        """Create or check the folder. Returns True when there is a checkpoint to resume from.

        A folder whose run never finished an epoch (it failed while loading data or building the model)
        is reused without ``--overwrite``. On ``--resume`` the config and the data ``fingerprint`` must
        match the ones recorded, and so must ``pretrained`` (``{"path", "sha256"}`` of ``--pretrained-file``,
        ``sha256`` None when the file is not there): the same bytes at another path are accepted; a missing
        file only when nothing in ``pretrained_needed_by`` (what reads the pretrained weights) is used.
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
            saved = self.read_config()
            diff = diff_configs(saved, config) if saved is not None else {}
            new = f"another --out (e.g. --out {self._free_path()})"
            if diff:  # --resume would be refused: it is another run's folder
                raise RunDirError(
                    f"--out {self.path} already holds another run (its {CONFIG} differs: "
                    f"{format_diff(diff)}); give this run {new}, or pass --overwrite to "
                    f"replace that one"
                )
            raise RunDirError(
                f"--out {self.path} already holds a run; pass --resume to continue it, "
                f"--overwrite to replace it, or {new} to start a new one"
            )
        else:
            saved = self.read_config()
            record = self._read_json(PRETRAINED)
            if pretrained is not None and record is not None:
                done = (self.read_summary() or {}).get("complete")  # nothing left to train: nothing reads it
                _check_pretrained(record, pretrained, () if done else pretrained_needed_by)
                if saved is not None and pretrained["sha256"] == record.get("sha256"):
                    saved = {**saved, "pretrained_file": config.get("pretrained_file")}  # moved, same bytes
            if saved is not None:
                diff = diff_configs(saved, config)
                if diff:
                    raise RunDirError(
                        f"--resume with a changed config in {self.path / CONFIG}: "
                        f"{format_diff(diff)}. Resume with the original settings or start "
                        f"a new --out"
                    )
            if fingerprint is not None and (self.path / FINGERPRINT).is_file():
                from ..data import compare_fingerprints

                change = compare_fingerprints(json.loads((self.path / FINGERPRINT).read_text()), fingerprint)
                if change:
                    raise RunDirError(
                        f"--resume refused: {change}. Resuming would re-carve the validation "
                        f"split, which could then hold images the run trained on. Restore "
                        f"the data, or start a new run (another --out, or --overwrite)"
                    )
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        if fingerprint is not None and not (self.path / FINGERPRINT).is_file():
            atomic_write_text(self.path / FINGERPRINT, json.dumps(fingerprint) + "\n")
        if pretrained is not None and pretrained["sha256"] is not None:
            atomic_write_text(self.path / PRETRAINED, json.dumps(pretrained) + "\n")
        return resume and (self.path / STATE).is_file() and (self.path / WEIGHTS).is_file()

    def moved_pretrained_file(self, path: str | Path) -> bool:
        """True when ``path`` holds the bytes of the run's recorded ``--pretrained-file`` (its SHA-256)."""
        from ..models import file_sha256

        record = self._read_json(PRETRAINED)
        p = Path(path).expanduser()
        if not record:
            return False
        return p.is_file() and file_sha256(p) == record.get("sha256")

    def _free_path(self) -> Path:
        """``PATH-2``, ``PATH-3``, ...: the first that does not exist (a suggestion for a new run)."""
        i = 2
        while self.path.with_name(f"{self.path.name}-{i}").exists():
            i += 1
        return self.path.with_name(f"{self.path.name}-{i}")

    def _read_json(self, name: str) -> dict[str, Any] | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None

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
        atomic_write_text(
            self.path / SUMMARY, json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n"
        )
        if self._tb is not None:
            self._tb.write_summary(summary)

    def write_predictions(self, arrays: dict[str, Any]) -> None:
        """``predictions.npz`` (``np.savez_compressed``), written atomically."""
        import numpy as np

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a path
                np.savez_compressed(f, **arrays)

        atomic_write(self.path / PREDICTIONS, write)

    def read_predictions(self) -> dict[str, Any] | None:
        """``predictions.npz``'s arrays by key, or None when the run has none."""
        import numpy as np

        p = self.path / PREDICTIONS
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def close(self) -> None:
        """Flush and close the TensorBoard writer (each epoch is flushed as it is written)."""
        if self._tb is not None:
            self._tb.close()

    def read_summary(self) -> dict[str, Any] | None:
        p = self.path / SUMMARY
        return json.loads(p.read_text()) if p.is_file() else None


def _check_pretrained(record: dict[str, Any], now: dict[str, Any], needed_by: tuple[str, ...]) -> None:
    """Refuse a resume whose --pretrained-file differs from the recorded one, or is missing but needed."""
    old, new, path = record.get("sha256"), now["sha256"], now["path"]
    started = "" if record.get("path") == path else f"; the run started from {record.get('path')}"
    if new is None:
        if needed_by:
            raise RunDirError(
                f"--resume refused: {' and '.join(needed_by)} use{'s' if len(needed_by) == 1 else ''} the "
                f"pretrained weights as a reference, but there is no file at {path} (where --pretrained-file "
                f"points{started}). Put the file (sha256 {old}) back, or pass its new place with "
                f"--pretrained-file"
            )
        return  # nothing reads it: the weights come from the checkpoint
    if new != old:
        why = f"; {' and '.join(needed_by)} would silently take it as the reference" if needed_by else ""
        raise RunDirError(
            f"--resume refused: --pretrained-file {path} is not the file the run started from (sha256 "
            f"{new}, the run recorded {old}{started}){why}. Restore the original file, or start a new run "
            f"(another --out, or --overwrite)"
        )


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
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git, no repo
        return None
