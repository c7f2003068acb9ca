"""RIFLE as a trainer plug-in: a thin adapter over :class:`rifle.core.Rifle`.

Paper: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349. Rule and defaults:
REFERENCE.md §3 (K = number of re-inits, at the start of epoch floor(i*E/(K+1)), guard ceil(E/8),
in-place re-init with reset_parameters(), head optimizer state cleared, global LR schedule).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import Rifle
from ..core.schedule import DEFAULT_MIN_STEPS_AFTER
from .base import Method, RunContext, register


@register("rifle")
@dataclass
class RifleMethod(Method):
    """Re-initialise the classifier head K times during fine-tuning (``--method rifle``)."""

    reinits: int = 3
    granularity: str = "epoch"  # "epoch" or "step" (same rule over total optimizer steps)
    guard: int | None = None  # in units of `granularity`; None = max(1, ceil(T/8))
    guard_steps: int | None = None  # a guard in optimizer steps (stricter one wins)
    min_steps_after: int | None = DEFAULT_MIN_STEPS_AFTER
    init: str = "default"  # reset_parameters(); lecun_normal, kaiming_normal (He), ...
    keep_optimizer_state: bool = False  # True = official code (stale momentum kept)
    head_lr_restart: bool = False  # True = official fc_lr_util=cyclic (head cosine per period)
    head: str | None = None  # dotted name(s), comma-separated; None = automatic
    modules: str | None = None  # also re-init: "last:N" blocks or a regex over module names
    trigger: str = "schedule"  # "schedule" (paper) or "converged" (docs/rifle.md#trigger)
    converged_acc: float | None = None  # the trigger's train-accuracy threshold; None = 0.97
    diagnose: bool = True  # measure each re-init (rifle.core.diagnosis) and print a verdict
    diagnosis_window: int = 5  # optimizer steps measured on each side of a re-init

    kind = "method"

    def __post_init__(self) -> None:
        if self.granularity not in ("epoch", "step"):
            raise ValueError(f"rifle granularity must be 'epoch' or 'step', got {self.granularity!r}")
        if self.trigger == "converged" and self.granularity == "step":
            raise ValueError(
                "--reinit-trigger converged decides once per epoch from the epoch's training "
                "accuracy: use --reinit-granularity epoch (step granularity is not supported)"
            )
        self.core: Rifle | None = None
        self._pending_state: dict[str, Any] | None = None

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        head = self.head.split(",") if self.head else ctx.head
        common: dict[str, Any] = dict(
            reinits=self.reinits,
            seed=ctx.seed,
            head=head,
            guard=self.guard,
            guard_steps=self.guard_steps,
            min_steps_after=self.min_steps_after,
            init=self.init,
            keep_optimizer_state=self.keep_optimizer_state,
            head_lr_restart=self.head_lr_restart,
            modules=self.modules,
            diagnose=self.diagnose,
            diagnosis_window=self.diagnosis_window,
        )
        if self.trigger != "schedule":
            common.update(trigger=self.trigger, converged_acc=self.converged_acc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.granularity == "epoch":
                self.core = Rifle(
                    model, optimizer, epochs=ctx.epochs, steps_per_epoch=ctx.steps_per_epoch, **common
                )
            else:  # steps_per_epoch: the diagnosis's loss window (the last epoch's worth of steps)
                self.core = Rifle(
                    model,
                    optimizer,
                    total_steps=ctx.epochs * ctx.steps_per_epoch,
                    steps_per_epoch=ctx.steps_per_epoch,
                    **common,
                )
        for w in caught:  # the core names its keyword; a run of rifle train / a config file has the flag
            text = re.sub(r"\bmin_steps_after=(\d+)", r"--min-steps-after \1", str(w.message))
            warnings.warn(
                text.replace("set min_steps_after to", "set --min-steps-after 0 to"), w.category, stacklevel=2
            )
        self._spe = max(1, ctx.steps_per_epoch)
        self._fp16 = ctx.config.get("amp") == "fp16"
        self._epochs, self._log = ctx.epochs, ctx.log
        if self._pending_state is not None:
            self.core.load_state_dict(self._pending_state)
            self._pending_state = None
        self._reported = len(self.core.diagnosis)  # restored from the checkpoint: already reported
        unit = self.core.unit
        if self.core.trigger == "converged":
            s = self.core.schedule
            ctx.log(
                f"RIFLE: re-init {self.core.module_names} at the start of an epoch once the previous "
                f"epoch's train accuracy reaches {self.core.converged_acc:g} (at most {s.reinits}, "
                f"at epochs 1..{s.total - s.guard}; fired so far: {self.core.fired})"
            )
        else:
            ctx.log(
                f"RIFLE: re-init {self.core.module_names} at the start of {unit}(s) "
                f"{self.core.points} of {self.core.schedule.total}"
            )

    @property
    def reinit_epochs(self) -> list[int]:
        """Epochs at (or, for step granularity, during) which a re-init happens."""
        assert self.core is not None, "setup() first"
        return [p // self._spe for p in self.core.points] if self.core.unit == "step" else self.core.points

    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        assert self.core is not None, "setup() first"
        if self.core.unit == "epoch":
            return {"reinit": self.core.on_epoch_start(epoch)}
        return {"reinit": epoch in self.reinit_epochs}

    def on_step_start(self, step: int) -> None:
        if self.core is not None and self.core.unit == "step":
            self.core.on_step_start(step)

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._batch = len(y)  # the step's batch: each micro-batch's loss is weighted by its share of it
        return x, y

    def on_batch_end(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        if self.core is not None:
            self.core.observe(loss, correct, count)
            # the head signal's gradient scale (rifle.core.diagnosis): the trainer backpropagates
            # loss * count / batch; fp16's GradScaler multiplies by a scale this plug-in cannot see
            self.core.head_grad_scale = None if self._fp16 else count / max(1, getattr(self, "_batch", count))

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        """Print the verdict of each re-init measured by now; its numbers go into the epoch's row."""
        if self.core is None:
            return {}
        if epoch == self._epochs - 1:
            self.core.close_diagnosis()
        if self.core.trigger == "converged":
            self.core.settle_trigger()  # every rank, before the checkpoint: the reduced accuracy
            report = self.core.trigger_report
            assert report is not None  # trigger="converged"
            if epoch == self._epochs - 1 and report["reason"]:
                self._log(
                    f"RIFLE trigger: {'no re-init' if not report['fired'] else 'fewer re-inits'}: "
                    f"{report['reason']} (docs/rifle.md#trigger)"
                )
        next_start = epoch + 1 if self.core.unit == "epoch" else (epoch + 1) * self._spe
        # every rank: the checkpoint (rank 0's) after this epoch precedes a re-init, or, with step
        # re-inits, may lie inside the loss window (the last steps_per_epoch steps) of one
        if self.core.unit == "step" or self.core.reinit_may_start_at(next_start):
            self.core.settle_diagnosis()
        new = self.core.diagnosis[self._reported :]
        self._reported += len(new)
        for d in new:
            self._log(d["verdict"])
        if not new:
            return {}
        return {"rifle_diagnosis": new[0] if len(new) == 1 else new}

    @property
    def diagnosis(self) -> list[dict[str, Any]]:
        """Every measured re-init of the run (``summary.json``'s ``rifle_diagnosis``)."""
        return self.core.diagnosis if self.core is not None else []

    @property
    def trigger_report(self) -> dict[str, Any] | None:
        """``trigger="converged"``: the re-inits it fired and why not more (``summary.json``)."""
        return self.core.trigger_report if self.core is not None else None

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict() if self.core is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.core is None:
            self._pending_state = state
        else:
            self.core.load_state_dict(state)
