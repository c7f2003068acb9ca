"""``DepthMonitor``: the trainer plug-in that records per-layer weight change every epoch and gradient
norms around re-inits into ``depth.jsonl`` (the definitions of :mod:`.depth`; docs/experiments.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.structure import in_head
from ..methods.base import Method, RunContext
from .depth import DEPTH_JSONL, tracked_layers


def monitor_epochs(config: dict[str, Any], epochs: int) -> list[int]:
    """The epochs at whose start RIFLE re-initialises (or would, with the config's K, for fine-tuning)."""
    from ..core.schedule import make_schedule

    try:
        k = int(config.get("reinits", 0) or 0)
        if k < 1:
            return []
        return list(make_schedule(epochs, k, config.get("guard"), warn=False).points)
    except (ValueError, TypeError):
        return []


class DepthMonitor(Method):
    """Record per-layer weight change every epoch and gradient norms around re-inits (``depth.jsonl``).

    Not registered: the run wiring adds it to the trainer's method list (after the run's methods).
    It changes nothing in training (no RNG draws, no loss terms): monitored and unmonitored runs
    produce identical metrics.

    * weights: after each epoch's optimizer steps, at the first evaluation forward of the epoch (a
      forward pre-hook on the model that fires in eval mode), one norm per weight tensor;
    * gradients: ``Tensor.register_post_accumulate_grad_hook`` on every tracked weight, i.e. the
      gradient of the full loss (method terms included) after ``backward`` and before
      ``optimizer.step()`` (with gradient accumulation: the accumulated gradient; under fp16 AMP the
      gradient is still multiplied by the loss scale). Recorded for global steps in
      ``[e*S - window, e*S + window)`` for each watched epoch ``e`` (``S`` steps per epoch): the
      re-init epochs of a RIFLE run; for other methods the epochs RIFLE would use with the run's
      ``reinits`` (``epochs=`` overrides).

    Records (one JSON object per line): ``{"type": "layers", "names", "kinds", "numel", "head",
    "watch_epochs", "window", "steps_per_epoch"}`` once; ``{"type": "weights", "epoch", "rel_change"}``
    per epoch; ``{"type": "grad", "epoch", "step", "reinit_epoch", "offset", "norms"}`` per watched step
    (``offset`` = step - first step of the re-init epoch: negative before, >= 0 after). On resume,
    records from the resumed epoch on are dropped first, so no epoch appears twice.
    """

    name = "depth-monitor"
    kind = "monitor"

    def __init__(self, out_dir: str | Path, window: int = 5, epochs: Sequence[int] | None = None) -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.path = Path(out_dir) / DEPTH_JSONL
        self.window = int(window)
        self.watch = None if epochs is None else sorted(int(e) for e in epochs)
        self._started = False
        self._dirty = False
        self._epoch = -1
        self._step = -1
        self._pending: list[float | None] | None = None
        self._pending_step = -1
        self._handles: list[Any] = []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        self.model = model
        state = dict(model.named_parameters())
        layers = [(n, k) for n, k in tracked_layers(model) if n in state]
        self.names = [n for n, _ in layers]
        self.params = [state[n] for n in self.names]
        pre = ctx.pretrained_state or {}
        # ctx.pretrained_state is the trainer's read-only copy of the weights before training: no 2nd copy
        self.ref = [
            pre[n].detach() if n in pre else p.detach().clone() for n, p in zip(self.names, self.params)
        ]
        self.ref_norm = [float(torch.linalg.vector_norm(r.double())) for r in self.ref]
        self.spe = max(1, ctx.steps_per_epoch)
        self.total_steps = ctx.epochs * self.spe
        self.watch_epochs = self.watch if self.watch is not None else monitor_epochs(ctx.config, ctx.epochs)
        self.windows: dict[int, int] = {}  # global step -> re-init epoch it belongs to
        for e in self.watch_epochs:
            for s in range(e * self.spe - self.window, e * self.spe + self.window):
                if 0 <= s < self.total_steps:
                    self.windows.setdefault(s, e)
        self.header = {
            "type": "layers",
            "names": self.names,
            "kinds": [k for _, k in layers],
            "numel": [int(p.numel()) for p in self.params],
            "head": [in_head(n, ctx.head_names) for n in self.names],
            "watch_epochs": self.watch_epochs,
            "window": self.window,
            "steps_per_epoch": self.spe,
            "method": ctx.config.get("method"),
            "reinits": ctx.config.get("reinits"),
        }
        for h in self._handles:
            h.remove()
        self._handles = [
            p.register_post_accumulate_grad_hook(self._grad_hook(i)) for i, p in enumerate(self.params)
        ]
        self._handles.append(model.register_forward_pre_hook(self._eval_hook))

    # ---- hooks
    def _grad_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if self._pending is not None and p.grad is not None:
                self._pending[i] = float(torch.linalg.vector_norm(p.grad.detach().double()))

        return hook

    def _eval_hook(self, module: nn.Module, args: tuple) -> None:
        if not module.training and self._dirty:
            self._flush_grads()
            self._write({"type": "weights", "epoch": self._epoch, "rel_change": self.rel_change()})
            self._dirty = False

    def rel_change(self) -> list[float]:
        out = []
        with torch.no_grad():
            for p, r, rn in zip(self.params, self.ref, self.ref_norm):
                num = float(torch.linalg.vector_norm((p.detach() - r.to(p.device)).double()))
                out.append(num / rn if rn > 0 else (0.0 if num == 0 else math.inf))
        return out

    # ---- protocol
    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        if not self._started:
            self._start(epoch)
        self._flush_grads()
        self._epoch = epoch
        return {}

    def on_step_start(self, step: int) -> None:
        self._flush_grads()
        self._dirty = True
        self._step = step
        if step in self.windows:
            self._pending = [None] * len(self.params)
            self._pending_step = step
        else:
            self._pending = None

    # ---- output
    def _start(self, epoch: int) -> None:
        """First epoch of this process: keep records of earlier epochs (resume), write the header."""
        self._started = True
        kept = []
        if epoch > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("type") != "layers" and rec.get("epoch", 0) < epoch:
                        kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from ..train.checkpoint import atomic_write_text

        atomic_write_text(self.path, "".join(x + "\n" for x in [json.dumps(self.header), *kept]))

    def _flush_grads(self) -> None:
        if self._pending is None:
            return
        s, e = self._pending_step, self.windows[self._pending_step]
        self._write(
            {
                "type": "grad",
                "epoch": s // self.spe,
                "step": s,
                "reinit_epoch": e,
                "offset": s - e * self.spe,
                "norms": self._pending,
            }
        )
        self._pending = None

    def _write(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._flush_grads()
        for h in self._handles:
            h.remove()
        self._handles = []
