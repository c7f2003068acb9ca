"""RIFLE as a Lightning callback: a thin adapter over :class:`rifle.core.Rifle`.

Paper: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349. The rule (K re-inits at the
start of epoch ``floor(i*E/(K+1))``, guard, in-place seeded re-init, head optimizer state cleared,
resume state) is the core's; see docs/rifle.md and docs/integrations/lightning.md.

Mapping onto Lightning:

- the run length is ``trainer.max_epochs`` (``granularity="epoch"``) or
  ``trainer.estimated_stepping_batches`` (``granularity="step"``, optimizer steps);
- the core is built in ``on_train_start``: the optimizers, the train dataloader and (on resume) the
  restored optimizer state all exist by then;
- re-init in ``on_train_epoch_start`` (epoch ``trainer.current_epoch``; also at the first batch of an
  epoch whose ``on_train_epoch_start`` Lightning skipped on resume) or ``on_train_batch_start`` (step
  ``trainer.global_step``; with gradient accumulation it fires on the first micro-batch);
- the head is looked up on the LightningModule (``find_head``); when none of the known names is an
  attribute of the LightningModule itself, each direct child (``self.net``, ``self.model``...) is
  searched, and exactly one must have a head. ``head="net.fc"`` names it explicitly;
- the optimizer is the one of ``trainer.optimizers`` that holds the head's parameters;
- ``state_dict()`` / ``load_state_dict()`` hold the core's progress, so ``Trainer.fit(ckpt_path=...)``
  never repeats or skips a re-init (Lightning restores callback state before ``on_train_start``);
- when a re-init fires, ``rifle/reinit`` (the re-init's index, 1..K) is logged for that epoch;
- the diagnosis (docs/rifle.md#when) is fed the loss ``training_step`` returns (no accuracy: none is
  known to the callback); at the end of the epoch in which a re-init's measurement completes, its
  verdict is printed (rank 0) and ``rifle/grad_ratio``, ``rifle/train_loss_before``,
  ``rifle/head_norm_before`` / ``after`` are logged. ``diagnosis`` holds every entry.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from ..core import Rifle, find_head
from ..core.heads import HeadSpec
from ..core.reinit import Initializer
from ..core.schedule import DEFAULT_MIN_STEPS_AFTER, RifleScheduleWarning
from . import check_trigger, unwrap_optimizer


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
        if not any(True for _ in child.parameters()):
            continue
        try:
            found.append((name, find_head(child)))
        except ValueError:
            continue
    if len(found) == 1:
        return found[0][1]
    if len(found) > 1:
        names = [f"{name}.{sub}" for name, mods in found
                 for sub, m in getattr(pl_module, name).named_modules() if any(m is x for x in mods)]
        raise ValueError(f"RIFLE: several sub-modules of {type(pl_module).__name__} have a classifier "
                         f"head ({', '.join(names)}); name the one to re-initialise, e.g. "
                         f"RifleCallback(head={names[0]!r})")
    raise ValueError(f"{top_error} (also searched each direct child of the LightningModule)")


class RifleCallback(pl.Callback):
    """Re-initialise the classifier head K times during ``Trainer.fit`` (RIFLE).

    Args: as :class:`rifle.core.Rifle` (``reinits``, ``head``, ``seed``, ``guard``, ``guard_steps``,
    ``min_steps_after``, ``init``, ``keep_optimizer_state``, ``head_lr_restart``, ``modules``,
    ``verify_replicas``) plus
    ``trigger``: only ``"schedule"``; ``"converged"`` raises (the callback sees no predictions, so no
    training accuracy: docs/rifle.md#trigger).
    ``granularity``: ``"epoch"`` (schedule over ``trainer.max_epochs``) or ``"step"`` (over
    ``trainer.estimated_stepping_batches``). One RifleCallback per Trainer (its checkpoint key is the
    class name). ``fired`` lists the ``(index, epoch_or_step)`` re-inits applied by this process.
    """

    def __init__(self, reinits: int = 3, head: HeadSpec | None = None, seed: int = 0,
                 granularity: str = "epoch", guard: int | None = None,
                 guard_steps: int | None = None,
                 min_steps_after: int | None = DEFAULT_MIN_STEPS_AFTER,
                 init: str | Initializer = "default", keep_optimizer_state: bool = False,
                 head_lr_restart: bool = False, modules: str | None = None,
                 verify_replicas: bool = True, trigger: str = "schedule") -> None:
        if granularity not in ("epoch", "step"):
            raise ValueError(f"granularity must be 'epoch' or 'step', got {granularity!r}")
        check_trigger(trigger)
        self.reinits, self.head, self.seed, self.granularity = reinits, head, seed, granularity
        self.options: dict[str, Any] = dict(
            guard=guard, guard_steps=guard_steps, min_steps_after=min_steps_after, init=init,
            keep_optimizer_state=keep_optimizer_state, head_lr_restart=head_lr_restart,
            modules=modules, verify_replicas=verify_replicas)
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
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        holding = [o for o in optimizers
                   if any(id(p) in head_ids for g in o.param_groups for p in g["params"])]
        optimizer = holding[0] if holding else (optimizers[0] if optimizers else None)
        total_steps = trainer.estimated_stepping_batches  # also sets up the train dataloader
        if self.granularity == "epoch":
            epochs = trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ValueError("RifleCallback(granularity='epoch') needs Trainer(max_epochs=E); "
                                 "for max_steps-only training use granularity='step'")
            batches = trainer.num_training_batches
            per_epoch = (math.ceil(batches / max(1, trainer.accumulate_grad_batches))
                         if batches != float("inf") else None)
            if per_epoch and total_steps < epochs * per_epoch:
                warnings.warn(f"RIFLE: the schedule spans max_epochs={epochs}, but max_steps="
                              f"{trainer.max_steps} ends training earlier; use granularity='step'",
                              RifleScheduleWarning, stacklevel=2)
            length: dict[str, Any] = dict(epochs=epochs, steps_per_epoch=per_epoch)
        else:
            if total_steps == float("inf"):
                raise ValueError("RifleCallback(granularity='step') needs a finite run: set max_steps "
                                 "or max_epochs")
            length = dict(total_steps=int(total_steps))
        return Rifle(pl_module, optimizer, reinits=self.reinits, seed=self.seed, head=heads,
                     on_reinit=self._on_reinit, **length, **self.options)

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

        def log(index: int) -> None:
            pl_module.log("rifle/reinit", float(index), on_step=False, on_epoch=True,
                          reduce_fx="max", batch_size=1)
        self._log = log

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rifle is not None and self.rifle.unit == "epoch":
            self._epoch_started = trainer.current_epoch
            self.rifle.on_epoch_start(trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.rifle is None:
            return
        if self.rifle.unit == "step":
            self.rifle.on_step_start(trainer.global_step)
        elif batch_idx == 0 and self._epoch_started != trainer.current_epoch:
            # resumed from a step checkpoint on an epoch's last batch: Lightning goes on with the next
            # epoch without calling on_train_epoch_start for it, so its re-init is applied here
            self._epoch_started = trainer.current_epoch
            self.rifle.on_epoch_start(trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.rifle is not None and loss is not None:
            if pl_module.automatic_optimization:  # Lightning divided it by accumulate_grad_batches
                loss = loss * trainer.accumulate_grad_batches
            self.rifle.observe(loss, None, 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for d in self._new_diagnoses(trainer):
            for key in ("grad_ratio", "train_loss_before", "head_norm_before", "head_norm_after"):
                if d.get(key) is not None:
                    pl_module.log(f"rifle/{key}", float(d[key]), on_step=False, on_epoch=True,
                                  reduce_fx="max", batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log = lambda index: None
        if self.rifle is not None:
            self.rifle.close_diagnosis()
            self._new_diagnoses(trainer)

    def _new_diagnoses(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        if self.rifle is None:
            return []
        new = self.rifle.diagnosis[self._reported:]
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
        if self.rifle is not None:
            return self.rifle.state_dict()
        return dict(self._pending) if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.rifle is not None:  # fit() again on a live callback: build() reloads it
            self.rifle = None
        self._pending = dict(state_dict)
