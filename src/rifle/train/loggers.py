"""Metric writers beside ``metrics.jsonl``: a flat ``metrics.csv`` and TensorBoard event files (``tb/``),
and the step lines printed when stderr is not a terminal.

``--log-to`` chooses the writers; after a resume TensorBoard shows each epoch once (docs/guide.md). The
step lines follow timm's ``--log-interval`` (github.com/huggingface/pytorch-image-models, train.py).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

KINDS = ("jsonl", "csv", "tensorboard")
AUTO = "auto"  # csv, and tensorboard when it is installed
CSV = "metrics.csv"
TB_DIR = "tb"
LOG_SECONDS = 30.0  # a step line at least this often, whatever --log-interval says


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def parse_kinds(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"csv,tensorboard"`` -> the writers to use (``jsonl`` always included). ``auto``: csv, and
    tensorboard when installed. Raises ``ValueError`` naming ``--log-to`` for an unknown writer, or for
    ``tensorboard`` when the package is not installed."""
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else (spec or [AUTO]))]
    items = [s for s in items if s] or [AUTO]
    out = {"jsonl"}
    for s in items:
        if s == AUTO:
            out.add("csv")
            if tensorboard_available():
                out.add("tensorboard")
        elif s in KINDS:
            if s == "tensorboard" and not tensorboard_available():
                raise ValueError(
                    f"--log-to {spec}: tensorboard is not installed (pip install tensorboard, "
                    f"or the report extra); choose --log-to csv or jsonl"
                )
            out.add(s)
        else:
            raise ValueError(
                f"--log-to {spec}: unknown writer {s!r}; choose from {', '.join(KINDS)} or "
                f"{AUTO} (comma-separated)"
            )
    return tuple(k for k in KINDS if k in out)


# ------------------------------------------------------------------------------------------ flat rows
def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become ``a.b`` keys; lists (e.g. per-layer ratios, several re-inits) stay lists."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, (list, tuple)):
        return json.dumps(v)
    return str(v)  # floats: the shortest text that reads back to the same float


def csv_text(rows: list[dict[str, Any]]) -> str:
    """``metrics.csv``: one row per epoch; columns in order of first appearance; empty = no value;
    lists as JSON text."""
    flat = [flatten(r) for r in rows]
    columns: dict[str, None] = {}
    for r in flat:
        columns.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in flat:
        w.writerow({k: _cell(r.get(k)) for k in columns})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ tensorboard
_TAGS = {
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "test_acc": "accuracy/test",
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "test_loss": "loss/test",
    "lr": "lr",
    "reinit": "rifle/reinit",
    "seconds": "time/epoch_seconds",
    "images_per_s": "time/images_per_s",
}
_SKIP = {"epoch", "rifle_diagnosis"}


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one ``metrics.jsonl`` row (step = its epoch): accuracy/{train,val,test},
    loss/{train,val,test}, loss/<method term> (``loss_<term>``), lr and lr/<param group>, rifle/reinit
    (1 at a re-init epoch), time/..., and any other numeric field as other/<field>."""
    out: dict[str, float] = {}
    for k, v in flatten({k: v for k, v in row.items() if k not in _SKIP}).items():
        x = _number(v)
        if x is None:
            continue
        if k in _TAGS:
            out[_TAGS[k]] = x
        elif k.startswith("loss_"):
            out["loss/" + k[len("loss_") :]] = x
        elif k.startswith("lr_groups."):
            out["lr/" + k[len("lr_groups.") :]] = x
        else:
            out["other/" + k.replace(".", "/")] = x
    return out


def diagnosis_entries(row: dict[str, Any]) -> list[dict[str, Any]]:
    d = row.get("rifle_diagnosis")
    return [] if d is None else [d] if isinstance(d, dict) else list(d)


def diagnosis_scalars(entry: dict[str, Any]) -> dict[str, float]:
    """One re-init's diagnosis (step = its re-init index 1..K): rifle_diagnosis/<numeric field>, and the
    backbone gradient ratio per third of the depth as
    rifle_diagnosis/grad_ratio_thirds/{first,middle,last}."""
    out = {
        f"rifle_diagnosis/{k}": x
        for k, v in entry.items()
        if k not in ("index", "at") and (x := _number(v)) is not None
    }
    thirds = entry.get("grad_ratio_thirds")
    if isinstance(thirds, (list, tuple)) and len(thirds) == 3:
        for name, v in zip(("first", "middle", "last"), thirds):
            if (x := _number(v)) is not None:
                out[f"rifle_diagnosis/grad_ratio_thirds/{name}"] = x
    return out


SUMMARY_SCALARS = ("final_test_acc", "final_val_acc", "best_val_acc", "test_acc_at_best_val")


class TensorBoardLog:
    """Events in ``<run>/tb``: one scalar series per metric (step = epoch), the RIFLE diagnosis
    (step = re-init index, verdict as text) and the run's summary (text, plus summary/* scalars)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: Any = None  # a SummaryWriter once opened (tensorboard imported lazily)
        self.logged = 0  # rows of the history already written by this process

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=0: TensorBoard drops what earlier processes wrote for this run; the history is replayed
        self.writer = SummaryWriter(str(self.path), purge_step=0)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if self.writer is None or len(rows) < self.logged:
            if self.writer is not None:
                self.writer.close()
            self._open()
            self.logged = 0
        for row in rows[self.logged :]:
            epoch = int(row["epoch"])
            for tag, x in epoch_scalars(row).items():
                self.writer.add_scalar(tag, x, epoch)
            for e in diagnosis_entries(row):
                step = int(e.get("index", 0))
                for tag, x in diagnosis_scalars(e).items():
                    self.writer.add_scalar(tag, x, step)
                if e.get("verdict"):
                    self.writer.add_text("rifle_diagnosis/verdict", str(e["verdict"]), step)
        self.logged = len(rows)
        self.writer.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writer is None:
            self._open()
        step = max(int(summary.get("epochs_run") or 1) - 1, 0)
        for k in SUMMARY_SCALARS:
            x = _number(summary.get(k))
            if x is not None:
                self.writer.add_scalar(f"summary/{k}", x, step)
        shown = {k: v for k, v in summary.items() if k not in ("classes", "versions")}
        self.writer.add_text("summary", "```\n" + json.dumps(shown, indent=2, default=str) + "\n```", step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------------------ step lines
def _clock(seconds: float) -> str:
    s = int(max(seconds, 0) + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StepLines:
    """Where tqdm's bars are off because stderr is not a terminal (batch jobs): a line every
    ``interval`` optimizer steps or at least every :data:`LOG_SECONDS`, with the epoch, step/total, mean
    training loss so far, img/s and the ETA of the epoch and of the training (evaluation excluded)."""

    def __init__(
        self,
        interval: int,
        epochs: int,
        steps_per_epoch: int,
        write: Callable[[str], None],
        seconds: float = LOG_SECONDS,
        world_size: int = 1,
    ) -> None:
        self.interval, self.epochs, self.total = interval, epochs, steps_per_epoch
        self.write, self.seconds, self.world_size = write, seconds, world_size

    def start(self, epoch: int, steps_per_epoch: int | None = None) -> None:
        self.epoch = epoch
        self.total = steps_per_epoch or self.total
        self.t0 = self.last = time.perf_counter()

    def step(self, step: int, images: int, loss_sum: Any, lr: float) -> None:
        """After optimizer step ``step`` (0-based) of the epoch; ``images`` seen so far in the epoch by
        this rank, ``loss_sum`` their summed loss (a tensor: read, a device sync, only when a line is
        printed). img/s counts every DDP rank (this rank's rate x world size)."""
        done = step + 1
        now = time.perf_counter()
        if done >= self.total or not (
            (self.interval and done % self.interval == 0) or now - self.last >= self.seconds
        ):
            return
        self.last = now
        elapsed = now - self.t0
        per_step = elapsed / done
        eta_epoch = per_step * (self.total - done)
        eta_run = eta_epoch + per_step * self.total * (self.epochs - 1 - self.epoch)
        loss = float(loss_sum) / max(images, 1)
        self.write(
            f"epoch {self.epoch} of {self.epochs}  step {done}/{self.total}  loss {loss:.4f}  "
            f"lr {lr:.5g}  {images * self.world_size / elapsed if elapsed > 0 else 0:.1f} img/s  "
            f"ETA {_clock(eta_epoch)} epoch, {_clock(eta_run)} training"
        )
