"""RIFLE as a Lightning callback: a thin adapter over :class:`rifle.core.Rifle`.

Paper: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349. The rule (K re-inits at the
start of epoch ``floor(i*E/(K+1))``, guard, in-place seeded re-init, head optimizer state cleared,
resume state) is the core's; see docs/rifle.md. How it maps onto Lightning (run length, when the core
is built, where re-inits fire, the head, the optimizer, resume, logging, the diagnosis, the converged
trigger): docs/integrations/lightning.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from ..core import Rifle, find_head
from ..core.structure import HeadSpec, has_params
from ..core.reinit import Initializer
from ..core.schedule import DEFAULT_MIN_STEPS_AFTER, RifleScheduleWarning
from . import check_trigger, diagnosis_metrics, unwrap_optimizer

ACC_CONTRACT = (
    "return {'loss': loss, 'correct': (logits.argmax(-1) == y).sum(), 'count': len(y)} from "
    "training_step (correct: the number of correct predictions in the batch, count: the "
    "number of examples in it)"
)


def find_lightning_head(pl_module: nn.Module, head: HeadSpec | None = None) -> list[nn.Module]:
    """The head of a LightningModule: ``find_head`` on it, else on each direct child (exactly one)."""
    if head is not None:
        return find_head(pl_module, head)
    try:
        return find_head(pl_module)
    except ValueError as err:
        top_error = err
    found: list[tuple[str, list[nn.Module]]] = []
    for name, child in pl_module.named_children():
        if not has_params(child):
            continue
        try:
            found.append((name, find_head(child)))
        except ValueError:
            continue
    if len(found) == 1:
        return found[0][1]
    if len(found) > 1:
        names = [
            f"{name}.{sub}"
            for name, mods in found
            for sub, m in getattr(pl_module, name).named_modules()
            if any(m is x for x in mods)
        ]
        raise ValueError(
            f"RIFLE: several sub-modules of {type(pl_module).__name__} have a classifier "
            f"head ({', '.join(names)}); name the one to re-initialise, e.g. "
            f"RifleCallback(head={names[0]!r})"
        )
    raise ValueError(f"{top_error} (also searched each direct child of the LightningModule)")


class RifleCallback(pl.Callback):
    """Re-initialise the classifier head K times during ``Trainer.fit`` (RIFLE).

    Args: as :class:`rifle.core.Rifle` (``reinits``, ``head``, ``seed``, ``guard``, ``guard_steps``,
    ``min_steps_after``, ``init``, ``keep_optimizer_state``, ``head_lr_restart``, ``modules``,
    ``verify_replicas``, ``trigger``, ``converged_acc``) plus
    ``granularity``: ``"epoch"`` (schedule over ``trainer.max_epochs``) or ``"step"`` (over
    ``trainer.estimated_stepping_batches``). ``trigger="converged"`` (epoch granularity only)
    re-initialises once the previous epoch's training accuracy reaches ``converged_acc``: it needs
    ``training_step`` to return ``{"loss": ..., "correct": ..., "count": ...}`` (docs/rifle.md#trigger).
    One RifleCallback per Trainer (its checkpoint key is the class name). ``fired`` lists the
    ``(index, epoch_or_step)`` re-inits applied by this process.
    """

    def __init__(
        self,
        reinits: int = 3,
        head: HeadSpec | None = None,
        seed: int = 0,
        granularity: str | None = "epoch",
        guard: int | None = None,
        guard_steps: int | None = None,
        min_steps_after: int | None = DEFAULT_MIN_STEPS_AFTER,
        init: str | Initializer = "default",
        keep_optimizer_state: bool = False,
        head_lr_restart: bool = False,
        modules: str | None = None,
        verify_replicas: bool = True,
        trigger: str = "schedule",
        converged_acc: float | None = None,
    ) -> None:
        granularity = check_trigger(trigger, granularity, "epoch")
        self.reinits, self.head, self.seed, self.granularity = reinits, head, seed, granularity
        self.trigger = trigger
        self.options: dict[str, Any] = dict(
            guard=guard,
            guard_steps=guard_steps,
            min_steps_after=min_steps_after,
            init=init,
            keep_optimizer_state=keep_optimizer_state,
            head_lr_restart=head_lr_restart,
            modules=modules,
            verify_replicas=verify_replicas,
            trigger=trigger,
            converged_acc=converged_acc,
        )
        self.rifle: Rifle | None = None
        self.fired: list[tuple[int, int]] = []
        self._pending: dict[str, Any] | None = None
        self._epoch_started: int | None = None  # the epoch on_train_epoch_start last ran for
        self._log: Callable[[int], None] = lambda index: None
        self._reported = 0

    # ------------------------------------------------------------------ build
    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Rifle:
        heads = find_lightning_head(pl_module, self.head)
        head_ids = {id(p) for m in heads for p in m.parameters()}
        optimizers = [u for o in trainer.optimizers if (u := unwrap_optimizer(o)) is not None]
        holding = [
            o for o in optimizers if any(id(p) in head_ids for g in o.param_groups for p in g["params"])
        ]
        optimizer = holding[0] if holding else (optimizers[0] if optimizers else None)
        total_steps = trainer.estimated_stepping_batches  # also sets up the train dataloader
        if self.granularity == "epoch":
            epochs = trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ValueError(
                    "RifleCallback(granularity='epoch') needs Trainer(max_epochs=E); "
                    "for max_steps-only training use granularity='step'"
                )
            batches = trainer.num_training_batches
            per_epoch = (
                math.ceil(batches / max(1, trainer.accumulate_grad_batches))
                if batches != float("inf")
                else None
            )
            if per_epoch and total_steps < epochs * per_epoch:
                warnings.warn(
                    f"RIFLE: the schedule spans max_epochs={epochs}, but max_steps="
                    f"{trainer.max_steps} ends training earlier; use granularity='step'",
                    RifleScheduleWarning,
                    stacklevel=2,
                )
            length: dict[str, Any] = dict(epochs=epochs, steps_per_epoch=per_epoch)
        else:
            if total_steps == float("inf"):
                raise ValueError(
                    "RifleCallback(granularity='step') needs a finite run: set max_steps or max_epochs"
                )
            length = dict(total_steps=int(total_steps))
        # Lightning runs training_step and backward inside optimizer.step(closure), after the step
        # pre-hooks: the core's pre-hook would read the previous step's gradients (none at all on the
        # first step after a resume). They are read in on_before_optimizer_step instead.
        return Rifle(
            pl_module,
            optimizer,
            reinits=self.reinits,
            seed=self.seed,
            head=heads,
            on_reinit=self._on_reinit,
            gradient_hook=False,
            **length,
            **self.options,
        )

    def _on_reinit(self, index: int, point: int) -> None:
        self.fired.append((index, point))
        self._log(index)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fired = []
        self._epoch_started = None
        self.rifle = self._build(trainer, pl_module)
        if self._pending is not None:
            self.rifle.load_state_dict(self._pending)
            self._pending = None
        self._reported = len(self.rifle.diagnosis)  # restored ones were reported before
        # the same-batch head signal recovers targets from dL/dlogits: Lightning divides each micro-batch's
        # loss by accumulate_grad_batches (automatic optimization); a 16-bit GradScaler scales it unseen
        if (
            "16-mixed" in str(trainer.precision)
            and "bf16" not in str(trainer.precision)
            or not pl_module.automatic_optimization
        ):
            self.rifle.head_grad_scale = None
        else:
            self.rifle.head_grad_scale = 1.0 / max(1, trainer.accumulate_grad_batches)

        def log(index: int) -> None:
            pl_module.log(
                "rifle/reinit", float(index), on_step=False, on_epoch=True, reduce_fx="max", batch_size=1
            )

        self._log = log

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rifle is not None and self.rifle.unit == "epoch":
            self._epoch_started = trainer.current_epoch
            self.rifle.on_epoch_start(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.rifle is None:
            return
        if self.rifle.unit == "step":
            self.rifle.on_step_start(trainer.global_step)
        elif batch_idx == 0 and self._epoch_started != trainer.current_epoch:
            # resumed from a step checkpoint on an epoch's last batch: Lightning goes on with the next
            # epoch without calling on_train_epoch_start for it, so its re-init is applied here
            self._epoch_started = trainer.current_epoch
            self.rifle.on_epoch_start(trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.rifle is None or outputs is None:  # None: training_step skipped the batch
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        correct = outputs.get("correct") if isinstance(outputs, dict) else None
        count = outputs.get("count") if isinstance(outputs, dict) else None
        if (correct is None) != (count is None) or (self.trigger == "converged" and correct is None):
            got = (
                f"a dict with keys {sorted(outputs)}"
                if isinstance(outputs, dict)
                else f"a {type(outputs).__name__}"
            )
            raise ValueError(
                f"RifleCallback(trigger={self.trigger!r}) reads the training accuracy from "
                f"what training_step returns, which was {got}: {ACC_CONTRACT}"
                if self.trigger == "converged"
                else f"RifleCallback: training_step returned {got}; give both 'correct' and "
                f"'count' or neither: {ACC_CONTRACT}"
            )
        if loss is None:
            return
        if pl_module.automatic_optimization:  # Lightning divided it by accumulate_grad_batches
            loss = loss * trainer.accumulate_grad_batches
        if correct is None or count is None:  # (both None: checked above)
            self.rifle.observe(loss, None, 1)
        else:
            self.rifle.observe(loss, correct, int(count))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """After the closure's backward (the step's final, accumulated gradients), before the update."""
        if self.rifle is not None and (
            self.rifle.optimizer is None or unwrap_optimizer(optimizer) is self.rifle.optimizer
        ):
            self.rifle.record_gradients()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank, before ModelCheckpoint (Lightning runs it after the other callbacks): the saved
        # state holds the epoch's accuracy and loss window summed over ranks
        if self.rifle is not None and self.rifle.unit == "epoch":
            self.rifle.settle_trigger()
            if self.rifle.reinit_may_start_at(trainer.current_epoch + 1):
                self.rifle.settle_diagnosis()
        for d in self._new_diagnoses(trainer):
            for key, value in diagnosis_metrics(d).items():
                pl_module.log(key, float(value), on_step=False, on_epoch=True, reduce_fx="max", batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log = lambda index: None
        if self.rifle is None:
            return
        self.rifle.close_diagnosis()
        self.rifle.settle_trigger()  # no-op when the last epoch was settled at its end
        for d in self._new_diagnoses(trainer):  # pl_module.log is not allowed here: the loggers directly
            for logger in trainer.loggers:
                logger.log_metrics(diagnosis_metrics(d), step=trainer.global_step)
        report = self.rifle.trigger_report
        if report is not None and report["reason"] and trainer.is_global_zero:
            print(
                f"RIFLE trigger: {'no re-init' if not report['fired'] else 'fewer re-inits'}: "
                f"{report['reason']} (docs/rifle.md#trigger)"
            )

    @property
    def trigger_report(self) -> dict[str, Any] | None:
        """``trigger="converged"``: :attr:`rifle.core.Rifle.trigger_report` (fired epochs, per-epoch
        accuracy, why fewer than K fired); ``None`` for the schedule."""
        return self.rifle.trigger_report if self.rifle is not None else None

    def _new_diagnoses(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        if self.rifle is None:
            return []
        new = self.rifle.diagnosis[self._reported :]
        self._reported += len(new)
        if trainer.is_global_zero:
            for d in new:
                print(d["verdict"])
        return new

    @property
    def diagnosis(self) -> list[dict[str, Any]]:
        """One dict per measured re-init (docs/rifle.md#when); restored with the checkpoint."""
        return self.rifle.diagnosis if self.rifle is not None else []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.rifle is not None:  # Lightning dumps the checkpoint on every rank: collective under DDP
            return self.rifle.state_dict(sum_ranks=True)
        return dict(self._pending) if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.rifle is not None:  # fit() again on a live callback: build() reloads it
            self.rifle = None
        self._pending = dict(state_dict)
