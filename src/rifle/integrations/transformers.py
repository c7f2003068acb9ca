"""RIFLE as a Hugging Face ``TrainerCallback``: a thin adapter over :class:`rifle.core.Rifle`.

Paper: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349. The rule (K re-inits at
``floor(i*T/(K+1))`` of T units, guard, in-place seeded re-init, head optimizer state cleared, resume
state) is the core's; see docs/rifle.md. How it maps onto the HF Trainer (step / epoch granularity,
the head, the optimizer, resume through ``ExportableState``, logging through ``Trainer.log``, the
diagnosis, the converged trigger's forward hook): docs/integrations/transformers.md.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from types import FrameType
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..core import Rifle, find_head, unwrap_model
from ..core.structure import HeadSpec, head_names
from ..core.reinit import Initializer, _weights_then_zero_bias
from ..core.schedule import DEFAULT_MIN_STEPS_AFTER, RifleScheduleWarning
from . import check_trigger, diagnosis_metrics, unwrap_optimizer

log = logging.getLogger(__name__)

HF_HEAD_NAMES = ("classifier", "score", "classification_head", "logits_proj")


def find_hf_head(model: nn.Module, head: HeadSpec | None = None) -> list[nn.Module]:
    """The module(s) to re-initialise in a HF ``*For{Sequence,Image}Classification`` model."""
    model = unwrap_model(model)
    if head is not None:
        return find_head(model, head)
    for name in HF_HEAD_NAMES:
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            linears = [m for m in sub.modules() if isinstance(m, nn.Linear)]
            if linears:
                return [linears[-1]]
    return find_head(model)


def hf_init(std: float) -> Initializer:
    """HF's own first init of a classifier: weight ~ N(0, std) (``config.initializer_range``), bias 0."""
    return _weights_then_zero_bias(lambda w: nn.init.normal_(w, mean=0.0, std=std))


class RifleTrainerCallback(TrainerCallback, ExportableState):
    """Re-initialise the classifier head K times during ``Trainer.train()`` (RIFLE).

    Args: as :class:`rifle.core.Rifle` (``reinits``, ``head``, ``seed``, ``guard``, ``guard_steps``,
    ``min_steps_after``, ``init``, ``keep_optimizer_state``, ``head_lr_restart``, ``modules``,
    ``verify_replicas``, ``trigger``, ``converged_acc``) plus
    ``granularity`` (``"step"`` or ``"epoch"``; default ``"step"``, and ``"epoch"`` with
    ``trigger="converged"``, which decides once per epoch from the training accuracy that a forward
    hook counts from the model's ``logits`` and the ``labels`` it is called with). ``init="hf"``
    re-draws the head as HF models first draw it (normal with ``config.initializer_range``, zero bias);
    the default is the core's ``reset_parameters()``. ``fired`` lists the ``(index, step_or_epoch)``
    re-inits this process applied.
    """

    def __init__(
        self,
        reinits: int = 3,
        head: HeadSpec | None = None,
        seed: int = 0,
        granularity: str | None = None,
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
        granularity = check_trigger(trigger, granularity, "step")
        if isinstance(init, str) and init.startswith("callable:"):
            raise ValueError(
                f"RIFLE: this checkpoint's callback used a callable init ({init[9:]}), which cannot be "
                f"rebuilt from trainer_state.json; leave restore_callback_states_from_checkpoint=False "
                f"(RifleTrainerCallback restores its own progress) and pass the callable again"
            )
        self.reinits, self.head, self.seed, self.granularity = reinits, head, seed, granularity
        self.guard, self.guard_steps, self.min_steps_after = guard, guard_steps, min_steps_after
        self.init, self.keep_optimizer_state = init, keep_optimizer_state
        self.head_lr_restart, self.modules, self.verify_replicas = head_lr_restart, modules, verify_replicas
        self.trigger, self.converged_acc = trigger, converged_acc
        self.rifle: Rifle | None = None
        self._hook: Any = None
        self._trainer: Any = None  # the Trainer running this callback (found in on_train_begin)
        self._step_sums: list[Any] | None = None  # [loss sum, correct, count] of this optimizer step
        self._saved_window: dict[str, Any] | None = None  # the state with open sums over ranks (checkpoint)
        self.fired: list[tuple[int, int]] = []
        self.progress: dict[str, Any] | None = None  # set by the Trainer's own callback restore
        self._reported, self._last_log_step = 0, 0

    # ------------------------------------------------------------------ hooks
    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("RifleTrainerCallback needs the Trainer's model (kwargs['model'])")
        self.fired = []
        self._trainer = self._find_trainer()
        init = self.init
        if init == "hf":
            init = hf_init(
                float(getattr(getattr(unwrap_model(model), "config", None), "initializer_range", 0.02))
            )
        if self.granularity == "step":  # steps_per_epoch: the diagnosis's loss window
            epochs = max(1, math.ceil(float(state.num_train_epochs or 1)))
            length: dict[str, Any] = dict(
                total_steps=int(state.max_steps), steps_per_epoch=max(1, int(state.max_steps) // epochs)
            )
        else:
            length = self._epoch_length(args, state, kwargs.get("train_dataloader"))
        self.rifle = Rifle(
            model,
            unwrap_optimizer(optimizer),
            **length,
            reinits=self.reinits,
            seed=self.seed,
            head=find_hf_head(model, self.head),
            guard=self.guard,
            guard_steps=self.guard_steps,
            min_steps_after=self.min_steps_after,
            init=init,
            keep_optimizer_state=self.keep_optimizer_state,
            head_lr_restart=self.head_lr_restart,
            modules=self.modules,
            verify_replicas=self.verify_replicas,
            on_reinit=self._on_reinit,
            trigger=self.trigger,
            converged_acc=self.converged_acc,
        )
        if state.global_step > 0:  # resumed: restore which re-inits happened
            saved = self.progress or self._saved_progress(state)
            if saved:
                self.rifle.load_state_dict(saved)
        self._step_sums, self._saved_window = None, None
        # the same-batch head signal recovers targets from dL/dlogits of one micro-batch: exact only when
        # that micro-batch's loss is its own mean cross-entropy (no accumulation scaling, no fp16 scaler)
        if args.gradient_accumulation_steps > 1 or getattr(args, "fp16", False):
            self.rifle.head_grad_scale = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.trigger == "converged":
            self._hook = unwrap_model(model).register_forward_hook(self._count_correct, with_kwargs=True)
        self.progress = None
        self._reported, self._last_log_step = len(self.rifle.diagnosis), int(state.global_step)
        self._check_logging(
            args,
            state,
            int(length["steps_per_epoch"]),
            self._steps_per_epoch(args, kwargs.get("train_dataloader")),
        )
        log.info(
            "RIFLE: re-init %s at the start of %s(s) %s of %d",
            self.rifle.module_names,
            self.rifle.unit,
            self.rifle.points,
            self.rifle.schedule.total,
        )

    def _check_logging(self, args: Any, state: Any, window: int, epoch_steps: int | None) -> None:
        """Warn when no training-loss log of the Trainer falls in the loss window before a re-init: with
        the schedule trigger the diagnosis reads that loss from the Trainer's logs (``on_log``).

        ``window``: the core's loss window in optimizer steps (an epoch's worth); ``epoch_steps``: the
        optimizer steps of a real epoch, when known (``logging_strategy="epoch"``)."""
        assert self.rifle is not None
        if self.trigger == "converged" or not self.rifle.points:
            return  # the converged trigger's forward hook counts loss and accuracy at every step
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        every = getattr(state, "logging_steps", None) or args.logging_steps
        if 0 < every < 1:  # a fraction of the run, as the Trainer reads it
            every = math.ceil(int(state.max_steps) * every)
        if strategy == "epoch":
            if not epoch_steps:
                return
            every = epoch_steps
        per = 1 if self.rifle.unit == "step" else epoch_steps or window
        first = 1 if getattr(args, "logging_first_step", False) else None

        def logged(p: int) -> bool:  # a log at a step in (p - window, p]
            lo = max(0, p - window)
            if first is not None and lo < first <= p:
                return True
            return strategy in ("steps", "epoch") and every > 0 and (p // int(every)) * int(every) > lo

        missed = [p for p in self.rifle.points if p * per > int(state.global_step) and not logged(p * per)]
        if not missed:
            return
        setting = (
            f"logging_steps={args.logging_steps:g}" if strategy == "steps" else "logging_strategy='epoch'"
        )
        how = (
            f"logs the training loss every {int(every)} optimizer steps ({setting})"
            if strategy in ("steps", "epoch")
            else "never logs the training loss (logging_strategy='no')"
        )
        limit = min([window] + ([p * per for p in self.rifle.points]))
        warnings.warn(
            f"RifleTrainerCallback: the Trainer {how}, so no loss is logged in the {window} steps "
            f"before the re-init(s) at {self.rifle.unit}(s) {missed}: RIFLE's diagnosis reads the "
            f"training loss from those logs and cannot measure whether the head had converged "
            f"('head convergence not measured'). Set TrainingArguments(logging_steps=...) to at "
            f"most {limit}",
            RuntimeWarning,
            stacklevel=3,
        )

    @staticmethod
    def _steps_per_epoch(args: Any, dataloader: Any) -> int | None:
        try:
            return max(1, math.ceil(len(dataloader) / max(1, args.gradient_accumulation_steps)))
        except TypeError:
            return None

    @staticmethod
    def _epoch_length(args: Any, state: Any, dataloader: Any) -> dict[str, Any]:
        """``epochs`` and ``steps_per_epoch`` for an epoch schedule; refuses a fractional run."""
        requested = float(args.num_train_epochs)
        if args.max_steps <= 0 and requested != math.floor(requested):
            raise ValueError(
                f"RifleTrainerCallback(granularity='epoch') needs a whole number of epochs, but "
                f"TrainingArguments(num_train_epochs={args.num_train_epochs}) trains "
                f"{state.max_steps} optimizer steps: RIFLE never rounds the run length (the re-inits "
                f"would land at the wrong epochs). Use a whole num_train_epochs, or "
                f"granularity='step' to schedule over the {state.max_steps} steps"
            )
        epochs = int(state.num_train_epochs)
        try:
            batches = len(dataloader)
        except TypeError:
            batches = None
        if epochs >= sys.maxsize or (dataloader is not None and batches is None):
            raise ValueError(
                "RifleTrainerCallback(granularity='epoch') needs a train dataset with a "
                "length (the Trainer cannot count epochs of an IterableDataset); use "
                "granularity='step' with max_steps"
            )
        if batches is None:  # no dataloader given: the Trainer's own estimate
            return dict(epochs=epochs, steps_per_epoch=max(1, int(state.max_steps) // max(1, epochs)))
        per_epoch = max(1, math.ceil(batches / max(1, args.gradient_accumulation_steps)))
        if state.max_steps < epochs * per_epoch:
            warnings.warn(
                f"RIFLE: the epoch schedule spans {epochs} epochs of {per_epoch} optimizer steps, but "
                f"max_steps={args.max_steps} ends training inside epoch {state.max_steps // per_epoch} "
                f"(0-based); use granularity='step' to schedule over the steps that run",
                RifleScheduleWarning,
                stacklevel=3,
            )
        return dict(epochs=epochs, steps_per_epoch=per_epoch)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rifle is not None and self.rifle.unit == "step":
            before = len(self.fired)
            self.rifle.on_step_start(int(state.global_step))
            self._log_history(state, before)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.rifle is not None and self.rifle.unit == "epoch":
            # state.epoch is e + (steps done in epoch e) / steps_per_epoch: exact at epoch starts
            epoch = float(state.epoch or 0.0)
            if epoch - math.floor(epoch + 1e-6) > 1e-6:
                return  # resumed inside an epoch: it started (and decided) before the checkpoint
            before = len(self.fired)
            self.rifle.on_epoch_start(int(epoch + 1e-6))
            self._log_history(state, before)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # every rank, before the epoch's checkpoint: the saved state holds the epoch's accuracy and
        # loss window summed over ranks
        if self.rifle is not None and self.rifle.unit == "epoch":
            self._flush_step()
            self.rifle.settle_trigger()
            self._saved_window = None
            epoch = int(float(state.epoch or 0.0) - 1e-6)  # state.epoch = e + 1 at the end of epoch e
            if self.rifle.reinit_may_start_at(epoch + 1):
                self.rifle.settle_diagnosis()

    def _count_correct(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook (training mode): correct predictions, size and summed cross-entropy of a batch."""
        if not module.training:
            return
        labels = kwargs.get("labels")
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        if labels is None or not isinstance(logits, torch.Tensor):
            raise ValueError(
                "RifleTrainerCallback(trigger='converged') counts the training accuracy from the model's "
                "forward: it must be called with labels=... (the Trainer passes the batch's 'labels'; it "
                "removes them from the call when label_smoothing_factor > 0 or compute_loss_func is set) "
                f"and return an output with .logits; got labels={'absent' if labels is None else 'given'}, "
                f"output {type(output).__name__}"
                f"{'' if isinstance(logits, torch.Tensor) else ' without logits'}"
            )
        if (
            logits.dim() != 2
            or labels.dim() != 1
            or labels.shape[0] != logits.shape[0]
            or labels.is_floating_point()
        ):
            raise ValueError(
                f"RifleTrainerCallback(trigger='converged') needs a single-label classifier "
                f"(logits of shape (batch, classes), integer labels of shape (batch,)); got "
                f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} {labels.dtype}"
            )
        logits = logits.detach().float()
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum()
        n = int(labels.shape[0])
        if self._step_sums is None:
            self._step_sums = [loss, correct, n]
        else:
            self._step_sums = [
                self._step_sums[0] + loss,
                self._step_sums[1] + correct,
                self._step_sums[2] + n,
            ]

    def _flush_step(self) -> None:
        """Feed the optimizer step's micro-batches (summed) to the core: one observation per step."""
        if self._step_sums is not None and self.rifle is not None:
            loss, correct, n = self._step_sums
            if n > 0:
                self.rifle.observe(loss / n, correct, n)
        self._step_sums = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.rifle is None or self.trigger == "converged" or not logs or "loss" not in logs:
            return  # converged: the forward hook feeds loss and accuracy
        steps = int(state.global_step) - self._last_log_step
        self._last_log_step = int(state.global_step)
        if steps > 0 and math.isfinite(float(logs["loss"])):
            self.rifle.observe(float(logs["loss"]), None, steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush_step()
        if self.rifle is not None:
            # a checkpoint follows (DefaultFlowCallback, called first, decided): under DDP, the open
            # sums of all ranks go into it (collective; every rank sees the same control)
            self._saved_window = (
                self.rifle.state_dict(sum_ranks=True, plain=True)  # JSON
                if control.should_save
                else None
            )
        self._report_diagnoses(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.rifle is not None:
            self._flush_step()
            self.rifle.close_diagnosis()
            self.rifle.settle_trigger()  # no-op when the last epoch was settled at its end
            self._report_diagnoses(state)
            report = self.rifle.trigger_report
            if report is not None and report["reason"] and state.is_world_process_zero:
                print(
                    f"RIFLE trigger: {'no re-init' if not report['fired'] else 'fewer re-inits'}: "
                    f"{report['reason']} (docs/rifle.md#trigger)"
                )
        self._trainer = None

    @property
    def trigger_report(self) -> dict[str, Any] | None:
        """``trigger="converged"``: :attr:`rifle.core.Rifle.trigger_report` (fired epochs, per-epoch
        accuracy, why fewer than K fired); ``None`` for the schedule."""
        return self.rifle.trigger_report if self.rifle is not None else None

    def _report_diagnoses(self, state: Any) -> None:
        if self.rifle is None or len(self.rifle.diagnosis) == self._reported:
            return
        for d in self.rifle.diagnosis[self._reported :]:
            # unmeasured numbers (None) and the verdict line go to log_history only: loggers take numbers
            self._emit(
                state,
                diagnosis_metrics(d),
                {
                    **{
                        f"rifle/{k}": d[k]
                        for k in ("grad_ratio", "train_loss_before", "head_norm_before", "head_norm_after")
                        if d.get(k) is None
                    },
                    "rifle/verdict": d["verdict"],
                },
            )
            if state.is_world_process_zero:
                print(d["verdict"])
        self._reported = len(self.rifle.diagnosis)

    def _find_trainer(self) -> Any:
        """The ``transformers.Trainer`` whose ``callback_handler`` is calling this callback: the caller
        frame's ``self`` (callbacks are called synchronously from the Trainer's own methods). A
        callback is given no reference to its Trainer, and only ``Trainer.log`` reaches the
        ``report_to`` integrations (TensorBoard, W&B, ...), which run before user callbacks."""
        frame: FrameType | None = sys._getframe(1)
        try:
            while frame is not None:
                obj = frame.f_locals.get("self")
                handler = getattr(obj, "callback_handler", None)
                if (
                    handler is not None
                    and callable(getattr(obj, "log", None))
                    and any(c is self for c in getattr(handler, "callbacks", ()))
                ):
                    return obj
                frame = frame.f_back
        finally:
            del frame
        warnings.warn(
            "RifleTrainerCallback: the Trainer calling this callback was not found; RIFLE's "
            "entries go to state.log_history only, not to the report_to integrations",
            RuntimeWarning,
            stacklevel=2,
        )
        return None

    def _emit(self, state: Any, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """``metrics`` through ``Trainer.log`` (``state.log_history`` plus every ``report_to``
        integration's ``on_log``), with ``extra`` added to the ``log_history`` entry only."""
        if self._trainer is not None:
            self._trainer.log(dict(metrics))
            entry = state.log_history[-1]
            entry.setdefault("epoch", float(state.epoch or 0.0))
        else:
            entry = {**metrics, "epoch": float(state.epoch or 0.0), "step": int(state.global_step)}
            state.log_history.append(entry)
        entry.update(extra or {})

    @property
    def diagnosis(self) -> list[dict[str, Any]]:
        """One dict per measured re-init (docs/rifle.md#when); restored on resume."""
        return self.rifle.diagnosis if self.rifle is not None else []

    def _log_history(self, state: Any, before: int) -> None:
        """The re-inits fired since ``before`` into ``state.log_history``, as the Trainer logs."""
        for index, _ in self.fired[before:]:
            self._emit(state, {"rifle/reinit": index})

    def _on_reinit(self, index: int, point: int) -> None:
        self.fired.append((index, point))
        log.info(
            "RIFLE: re-initialised %s (re-init %d, %s %d)",
            self.rifle.module_names if self.rifle else "head",
            index,
            self.granularity,
            point,
        )

    # ------------------------------------------------------------------ state
    def _saved_progress(self, state: Any) -> dict[str, Any] | None:
        entry = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        entries = entry if isinstance(entry, list) else [entry] if entry else []
        saved = [e.get("attributes", {}).get("progress") for e in entries if isinstance(e, dict)]
        saved = [s for s in saved if s]
        for s in saved:  # several RIFLE callbacks: the one with this schedule
            if self.rifle is not None and list(s.get("points", [])) == self.rifle.points:
                return s
        return saved[0] if saved else None

    def state(self) -> dict[str, Any]:
        head = self.head
        if self.rifle is not None:
            head = head_names(unwrap_model(self.rifle.model), self.rifle.head_modules)
        elif not (
            head is None
            or isinstance(head, str)
            or (isinstance(head, (list, tuple)) and all(isinstance(h, str) for h in head))
        ):
            head = None  # a module: named once the core is built
        init = (
            self.init
            if isinstance(self.init, str)
            else f"callable:{getattr(self.init, '__qualname__', type(self.init).__name__)}"
        )
        return {
            "args": {
                "reinits": self.reinits,
                "head": head,
                "seed": self.seed,
                "granularity": self.granularity,
                "guard": self.guard,
                "guard_steps": self.guard_steps,
                "min_steps_after": self.min_steps_after,
                "init": init,
                "keep_optimizer_state": self.keep_optimizer_state,
                "head_lr_restart": self.head_lr_restart,
                "modules": self.modules,
                "verify_replicas": self.verify_replicas,
                "trigger": self.trigger,
                "converged_acc": self.converged_acc,
            },
            "attributes": {"progress": self._progress()},
        }

    def _progress(self) -> dict[str, Any] | None:
        if self.rifle is None:
            return self.progress
        if self._saved_window is not None:  # with the open sums of all ranks (on_step_end)
            return self._saved_window
        return self.rifle.state_dict(plain=True)  # trainer_state.json: tensors as lists
