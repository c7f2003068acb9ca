"""``Rifle``: the schedule and the in-place re-init tied to a model and its optimizer.

RIFLE: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349. Drop it into any loop::

    rifle = Rifle(model, optimizer, epochs=40, reinits=3, seed=0)   # or head=model.fc
    for epoch in range(40):
        rifle.on_epoch_start(epoch)          # re-initialises when scheduled; returns whether it did
        ...train one epoch...

or per optimizer step with ``total_steps=`` and ``on_step_start(step)`` (0-based, in ``[0, T)``).
``state_dict()`` / ``load_state_dict()`` carry which re-inits were applied (``applied``) or passed
without being applied (``skipped``), so a resumed run never repeats or skips one.
``trigger="converged"`` (:mod:`rifle.core.trigger`) replaces the schedule (docs/rifle.md#trigger).
A diagnosis is on by default (:mod:`rifle.core.diagnosis`): feed ``rifle.observe(loss=..., correct=...,
count=...)`` per batch; gradients are read by an optimizer step pre-hook; ``rifle.verdicts()`` gives
one line per re-init (docs/rifle.md#when).
The object knows nothing of trainers; the Lightning / HF / CLI adapters are thin wrappers over it.
Over ~400 lines for one reason: the class docstring documents every argument of the public API.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .diagnosis import Diagnosis, backbone_weights
from .head_signal import plain_state
from .structure import HeadSpec, find_head, head_names, select_modules
from .reinit import (
    Initializer,
    canonical_init,
    clear_optimizer_state,
    cosine_factor,
    get_initializer,
    reinit_,
)
from .replicas import open_sums_for_this_rank, open_sums_over_ranks, verify_replicas
from .schedule import (
    DEFAULT_MIN_STEPS_AFTER,
    Schedule,
    check_step_budget,
    default_guard,
    make_schedule,
    warn_at_caller,
)
from .trigger import ConvergedTrigger, trigger_schedule
from .verdict import CONVERGED_ACC

STATE_VERSION = 2  # 2: "applied" / "skipped" / "init"; version 1 had only "done"
_RENAMED_INITS = {"kaiming_normal": "lecun_normal"}  # name -> what it drew in version-1 states


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


class Rifle:
    """Periodic in-place re-initialisation of a model's classifier head (RIFLE, arXiv 2007.03349).

    Args:
        model: the model being fine-tuned (DDP / compiled wrappers are looked through).
        optimizer: its optimizer; the head's per-parameter state is cleared at each re-init unless
            ``keep_optimizer_state=True`` (the official code's behaviour). May be ``None``.
        epochs / total_steps: the run's length in epochs (use ``on_epoch_start``) or optimizer steps
            (use ``on_step_start``); exactly one.
        reinits: K, the number of re-initialisations (K + 1 equal periods).
        seed: run seed; re-init ``i`` draws from a generator seeded by ``(seed, i)``.
        head: module, dotted name or list of them; ``None`` finds the classifier automatically.
        guard: drop re-inits leaving fewer than this many units after them (default ``ceil(T/8)``).
        steps_per_epoch: optimizer steps per epoch, when known: enables ``guard_steps`` and the
            ``min_steps_after`` warning for epoch schedules.
        guard_steps: a guard given in optimizer steps (combined with ``guard``: the stricter wins).
        min_steps_after: warn when a period after a re-init has fewer optimizer steps (default 100).
        init: ``"default"`` (the module's ``reset_parameters``), ``"lecun_normal"`` (std
            ``1/sqrt(fan_in)``), ``"kaiming_normal"`` (He: std ``sqrt(2/fan_in)``),
            ``"xavier_uniform"``, ``"normal"`` (std 0.01), ``"norm_matched"`` (the default draw at
            the old head's row norms), ``"shrink_perturb[:LAMBDA,SIGMA]"`` (``LAMBDA * old + SIGMA *``
            the default draw; 0.4, 0.1), ``-`` or ``_``, or a callable ``f(module)`` that draws from
            torch's global CPU RNG (it is run on the re-init's private stream; docs/rifle.md).
        head_lr_restart: restart a cosine LR for the head's param group(s) at each period (the
            official ``fc_lr_util=cyclic``); the head must then be alone in its param group(s).
        modules: also re-initialise these backbone modules: ``"last:N"`` (the last N blocks) or a
            regular expression over dotted module names (see :func:`rifle.core.structure.select_modules`).
        verify_replicas: under ``torch.distributed`` with several ranks, all-gather a checksum of the
            new head after each re-init and raise ``ReplicaDivergenceError`` if ranks differ.
        diagnose: measure each re-init (:mod:`rifle.core.diagnosis`): train loss / accuracy before it
            (from :meth:`observe`), head norm before / after, backbone gradient ratio after / before
            over ``diagnosis_window`` optimizer steps on each side, by backbone third, and the
            same-batch head-signal ratio (one ``nn.Linear`` head; see :attr:`head_grad_scale`). Gradients are
            read by an optimizer step pre-hook; without an optimizer call :meth:`record_gradients`
            once per step, after ``backward()``. Loss window: the epoch before the re-init (epoch
            schedules) or the last ``steps_per_epoch`` (default 100) steps (step schedules).
        trigger: ``"schedule"`` (the paper's fixed points) or ``"converged"`` (epoch runs only): at the
            start of epoch ``e >= 1``, re-initialise when the training accuracy over epoch ``e - 1``
            (from :meth:`observe`, summed over data-parallel ranks) is ``>= converged_acc``; at most
            ``reinits`` times, never inside the guard, and the next one only after a full epoch after
            the re-init epoch reaches the threshold again. See :attr:`trigger_report`.
        converged_acc: the trigger's threshold (default 0.97, the diagnosis' "converged" accuracy).
        gradient_hook: read the diagnosis' gradients in an optimizer step pre-hook (default); False when
            the loop calls :meth:`record_gradients` itself (e.g. Lightning, whose backward runs inside
            ``optimizer.step(closure)``, after the pre-hooks).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        epochs: int | None = None,
        total_steps: int | None = None,
        reinits: int = 3,
        seed: int = 0,
        head: HeadSpec | None = None,
        guard: int | None = None,
        steps_per_epoch: int | None = None,
        guard_steps: int | None = None,
        min_steps_after: int | None = DEFAULT_MIN_STEPS_AFTER,
        init: str | Initializer = "default",
        keep_optimizer_state: bool = False,
        head_lr_restart: bool = False,
        on_reinit: Callable[[int, int], None] | None = None,
        verify_replicas: bool = True,
        modules: str | None = None,
        diagnose: bool = True,
        diagnosis_window: int = 5,
        trigger: str = "schedule",
        converged_acc: float | None = None,
        gradient_hook: bool = True,
    ) -> None:
        if (epochs is None) == (total_steps is None):
            raise ValueError(
                "give exactly one of epochs= (use on_epoch_start) or total_steps= (use on_step_start)"
            )
        if trigger not in ("schedule", "converged"):
            raise ValueError(
                f"trigger={trigger!r}: choose 'schedule' (the paper's fixed re-init points) "
                f"or 'converged' (re-init once the head has converged; docs/rifle.md#trigger)"
            )
        if trigger == "schedule" and converged_acc is not None:
            raise ValueError(f"converged_acc={converged_acc!r} applies only with trigger='converged'")
        if trigger == "converged":
            if epochs is None:
                raise ValueError(
                    "trigger='converged' decides from each epoch's training accuracy and "
                    "needs an epoch schedule (epochs=, on_epoch_start); step granularity "
                    "is not supported with it"
                )
            if head_lr_restart:
                raise ValueError(
                    "head_lr_restart needs the re-init points in advance; it cannot be "
                    "combined with trigger='converged'"
                )
            acc = CONVERGED_ACC if converged_acc is None else converged_acc
            if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 < acc <= 1:
                raise ValueError(f"converged_acc={converged_acc!r}: a training accuracy in (0, 1]")
            converged_acc = float(acc)
        self.trigger = trigger
        self.converged_acc = converged_acc
        self.model = model
        self.optimizer = optimizer
        self.seed = int(seed)
        self.init = canonical_init(init)  # validates; one spelling in the state (resume check)
        get_initializer(self.init)
        self.keep_optimizer_state = keep_optimizer_state
        self.head_lr_restart = head_lr_restart
        self.on_reinit = on_reinit
        self.verify_replicas = verify_replicas
        self.unit = "epoch" if epochs is not None else "step"
        total = epochs if epochs is not None else total_steps
        assert total is not None  # exactly one of them (checked above)
        self.steps_per_unit = (steps_per_epoch or None) if self.unit == "epoch" else 1
        if guard_steps is not None:
            if self.steps_per_unit is None:
                raise ValueError("guard_steps needs steps_per_epoch (or a step schedule)")
            g = default_guard(total) if guard is None else guard
            guard = max(g, math.ceil(guard_steps / self.steps_per_unit))
        if trigger == "converged":
            self.schedule: Schedule = trigger_schedule(total, reinits, guard)
        else:
            self.schedule = make_schedule(total, reinits, guard, unit=self.unit)
        if self.steps_per_unit and min_steps_after and trigger == "schedule":
            check_step_budget(self.schedule, self.steps_per_unit, min_steps_after)
        self._trigger = (
            ConvergedTrigger(converged_acc) if trigger == "converged" and converged_acc is not None else None
        )
        inner = unwrap_model(model)
        self.head_modules: list[nn.Module] = find_head(inner, head)
        extra = select_modules(inner, modules) if modules else []
        self.modules: list[nn.Module] = self.head_modules + [
            m for m in extra if all(m is not h for h in self.head_modules)
        ]
        self.module_names = head_names(inner, self.modules)
        self._check_optimizer_holds_head()
        self.applied: list[int] = []  # re-init indices (1-based i of the rule) applied
        self.skipped: list[int] = []  # ... passed without being applied (warned once)
        self._started: int | None = None  # the last epoch / step whose on_*_start ran (resume re-entry)
        self._restored = False  # load_state_dict() was called (a resumed loop may start past 0)
        if head_lr_restart:
            self._head_groups()  # validate the param groups now; records each group's initial_lr
        self._diag: Diagnosis | None = None
        if diagnose:
            loss_window = None if self.unit == "epoch" else int(steps_per_epoch or 100)
            self._diag = Diagnosis(
                backbone_weights(inner, exclude=self.head_modules),
                window=diagnosis_window,
                loss_window=loss_window,
                head=self.modules,
            )
            if gradient_hook and optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
                optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.record_gradients())
            self._spe_known = steps_per_epoch if self.unit == "epoch" else None

    # ------------------------------------------------------------------ schedule
    @property
    def reinit_epochs(self) -> list[int]:
        """0-based epochs at whose start a re-init happens (epoch schedules)."""
        if self.unit != "epoch":
            raise AttributeError("this Rifle runs on a step schedule; use reinit_steps")
        return list(self.schedule.points)

    @property
    def reinit_steps(self) -> list[int]:
        if self.unit != "step":
            raise AttributeError("this Rifle runs on an epoch schedule; use reinit_epochs")
        return list(self.schedule.points)

    @property
    def points(self) -> list[int]:
        return list(self.schedule.points)

    @property
    def reinit_parameters(self) -> list[nn.Parameter]:
        """The parameters a re-init overwrites (head and ``modules=``), in module order."""
        return [p for m in self.modules for p in m.parameters()]

    @property
    def done(self) -> list[int]:
        """Re-init indices no longer pending: ``applied`` and ``skipped`` together, sorted."""
        return sorted({*self.applied, *self.skipped})

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int) -> bool:
        """Re-initialise when epoch ``epoch`` (0-based) starts a period; returns whether it did. Called
        again for the epoch under way (a loop resumed inside it, after :meth:`load_state_dict`), it
        changes nothing: the epoch's re-init, trigger decision and diagnosis windows stand."""
        if self.unit != "epoch":
            raise RuntimeError("this Rifle was built with total_steps=; call on_step_start(step)")
        if self._reentered(epoch):
            return False
        if self._trigger is not None and self._trigger.decide(self._check_t(epoch), self.schedule):
            self.schedule = dataclasses.replace(self.schedule, points=tuple(self._trigger.fired))
        fired = self._tick(epoch)
        if self._diag is not None:
            self._diag.new_period()  # the loss window is the epoch
            if self.reinit_may_start_at(epoch + 1):
                # only the last `window` steps of this epoch matter: skip the others when S is known
                recording = (
                    self._diag._after is not None
                    if self.trigger == "converged"  # re-armed
                    else self._diag.recording
                )  # each possible epoch: still its last steps only
                skip = 0 if recording else max(0, (self._spe_known or 0) - self._diag.window)
                self._diag.arm(skip)
            elif self.trigger == "converged":
                self._diag.disarm()  # no re-init possible at the next epoch: read no more norms
        return fired

    def on_step_start(self, step: int) -> bool:
        if self.unit != "step":
            raise RuntimeError("this Rifle was built with epochs=; call on_epoch_start(epoch)")
        if self._reentered(step):
            return False
        fired = self._tick(step)
        if self._diag is not None:
            self._diag.set_step(step)
            w = self._diag.window
            if any(self.reinit_may_start_at(p) for p in range(step + 1, step + w + 1)):
                self._diag.arm()
        return fired

    def reinit_may_start_at(self, t: int) -> bool:
        """Whether a re-init may happen at the start of epoch/step ``t`` (scheduled and not yet done, or
        possible for the converged trigger)."""
        if self._trigger is not None:  # converged: a re-init at t is possible (decided at t from epoch t-1)
            return self._trigger.may_fire(t, self.schedule)
        return any(
            p == t and i not in self.applied and i not in self.skipped
            for i, p in enumerate(self.schedule.points, start=1)
        )

    # ------------------------------------------------------------------ diagnosis
    def observe(
        self, loss: float | torch.Tensor, correct: float | torch.Tensor | None = None, count: int = 1
    ) -> None:
        """Feed one training batch: its mean ``loss``, number of ``correct`` predictions, size."""
        if self._diag is not None:
            self._diag.observe(loss, correct, count)
        if self._trigger is not None:
            self._trigger.observe(correct, count)

    # ------------------------------------------------------------------ converged-head trigger
    @property
    def fired(self) -> list[int]:
        """``trigger="converged"``: the epochs it re-initialised at (= ``points``); ``[]`` otherwise."""
        return self._trigger.fired if self._trigger is not None else []

    def settle_trigger(self) -> None:
        """Close the accuracy of the epoch being observed, summed over data-parallel ranks (all ranks
        call it together; the trainer does at each epoch end, before the checkpoint)."""
        if self._trigger is not None:
            self._trigger.settle()

    @property
    def trigger_report(self) -> dict[str, Any] | None:
        """``trigger="converged"``: ``{"trigger", "converged_acc", "fired", "train_acc", "reason"}``;
        ``reason`` says why fewer than ``reinits`` re-inits fired (None when all did). The last
        epoch's accuracy counts once :meth:`settle_trigger` has been called after it."""
        return self._trigger.report(self.schedule) if self._trigger is not None else None

    def record_gradients(self) -> None:
        """Read the backbone gradients of this optimizer step (automatic when an optimizer is given)."""
        if self._diag is not None and self._diag.recording:
            self._diag.record_step()

    @property
    def head_grad_scale(self) -> float | None:
        """Factor by which the gradient reaching the head's output exceeds that of the micro-batch's
        mean cross-entropy (default 1.0; ``1/N`` when each of N accumulated micro-batch losses is
        divided by N; the loss scale under fp16 AMP; ``None``: unknown, the head signal is not
        measured). Read when the last batch before a re-init is frozen."""
        return self._diag.head_grad_scale if self._diag is not None else None

    @head_grad_scale.setter
    def head_grad_scale(self, value: float | None) -> None:
        if self._diag is not None:
            self._diag.head_grad_scale = None if value is None else float(value)

    def settle_diagnosis(self) -> None:
        """Sum the loss window over data-parallel ranks now (all ranks call it together): before a
        checkpoint written by one rank just ahead of a re-init, so a resume there is exact."""
        if self._diag is not None:
            self._diag.settle()

    def close_diagnosis(self) -> None:
        """Finish an open re-init measurement with the steps recorded so far (end of training)."""
        if self._diag is not None:
            self._diag.close()

    @property
    def diagnosis(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per measured re-init (``verdict`` is its printed line)."""
        return [dict(e) for e in self._diag.entries] if self._diag is not None else []

    def verdicts(self) -> list[str]:
        return [e["verdict"] for e in self.diagnosis]

    def _reentered(self, t: int) -> bool:
        """True when ``t`` is the epoch / step already started (nothing to do again); on the first call,
        check the modules and warn about a 1-based loop."""
        t = self._check_t(t)
        if t == self._started:
            if self.head_lr_restart:
                self._apply_head_lr(t)
            return True
        if self._started is None and not self._restored:
            self._check_attached("the first on_" + self.unit + "_start")
            if t == 1:
                warn_at_caller(
                    f"RIFLE: the first call is on_{self.unit}_start(1): {self.unit}s are 0-based, in "
                    f"[0, {self.schedule.total}); a loop over range(1, {self.schedule.total + 1}) shifts "
                    f"every re-init by one {self.unit} and fails at its last {self.unit}. Call "
                    f"on_{self.unit}_start(0) first (or load_state_dict() before resuming at {self.unit} 1)"
                )
        self._started = t
        return False

    def _param_names(self) -> dict[int, str]:
        inner = unwrap_model(self.model)
        return {id(p): n for n, p in inner.named_parameters(remove_duplicate=False)}

    def _check_optimizer_holds_head(self, when: str | None = None) -> None:
        """The optimizer must train the parameters a re-init overwrites (those with requires_grad)."""
        if self.optimizer is None:
            return
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.reinit_parameters if p.requires_grad and id(p) not in held]
        if missing:
            names = self._param_names()
            listed = ", ".join(names.get(id(p), f"<{tuple(p.shape)}>") for p in missing)
            msg = (
                f"the optimizer does not hold {listed} (parameters of {', '.join(self.module_names)}, "
                f"which RIFLE re-initialises): the re-initialised head would never be trained. Build "
                f"the optimizer over the model's parameters after replacing its head, or pass the "
                f"optimizer that trains the head (or optimizer=None)"
            )
            if when is None:
                raise ValueError(msg)
            raise RuntimeError(f"RIFLE {when}: {msg}")

    def _check_attached(self, when: str) -> None:
        """Every module to re-initialise is still part of the model (not replaced after ``Rifle(...)``)
        and, with an optimizer, trained by it."""
        inner = unwrap_model(self.model)
        ids = {id(m) for m in inner.modules()}
        gone = [n for n, m in zip(self.module_names, self.modules) if id(m) not in ids]
        if gone:
            raise RuntimeError(
                f"RIFLE {when}: {', '.join(gone)} is no longer part of the model (replaced after "
                f"Rifle(...) was built?): re-initialising it would change nothing the model uses. Build "
                f"Rifle (and the optimizer) after the model's head is in place"
            )
        self._check_optimizer_holds_head(when)

    def _check_t(self, t: int) -> int:
        total = self.schedule.total
        try:
            t = operator.index(t)  # ints, numpy / torch integer scalars
        except TypeError:
            raise TypeError(f"on_{self.unit}_start({t!r}): expected an integer {self.unit} index") from None
        if not 0 <= t < total:
            raise ValueError(
                f"on_{self.unit}_start({t!r}): {self.unit}s are 0-based, in [0, {total}) for this "
                f"{total}-{self.unit} run (a loop over range(1, E+1) would shift every re-init by one); "
                f"pass the 0-based {self.unit} index"
            )
        return t

    def _tick(self, t: int) -> bool:
        t = self._check_t(t)
        fired = False
        for idx, point in enumerate(self.schedule.points, start=1):
            if idx in self.applied or idx in self.skipped:
                continue
            if point == t:
                self.reinit(idx)
                fired = True
            elif point < t:
                warn_at_caller(
                    f"RIFLE: the re-init scheduled at {self.unit} {point} was not applied (now at "
                    f"{self.unit} {t}): call on_{self.unit}_start for every {self.unit}, and restore "
                    f"state with load_state_dict() when resuming"
                )
                self.skipped.append(idx)  # warn once
        if self.head_lr_restart:
            self._apply_head_lr(t)
        return fired

    def reinit(self, index: int) -> None:
        """Apply re-init number ``index`` now (normally called by the schedule)."""
        self._check_attached(f"re-init {index}")
        if self._diag is not None:
            at = self.schedule.points[index - 1] if index <= len(self.schedule.points) else -1
            self._diag.begin(index, self.unit, at, self.head_modules)
        reinit_(self.modules, self.seed, index, self.init)
        if self._diag is not None:
            self._diag.end(self.head_modules)
        if self.verify_replicas:
            verify_replicas(self.reinit_parameters, f"RIFLE re-init {index}")
        if not self.keep_optimizer_state:
            clear_optimizer_state(self.optimizer, self.reinit_parameters)
        if index in self.skipped:
            self.skipped.remove(index)
        if index not in self.applied:
            self.applied.append(index)
        if self.on_reinit is not None:
            self.on_reinit(
                index, self.schedule.points[index - 1] if index <= len(self.schedule.points) else -1
            )

    # ------------------------------------------------------------------ head LR restart
    def _head_groups(self) -> list[tuple[dict[str, Any], float]]:
        if self.optimizer is None:
            raise ValueError("head_lr_restart needs the optimizer")
        head_ids = {id(p) for m in self.head_modules for p in m.parameters()}
        groups = []
        for g in self.optimizer.param_groups:
            ids = {id(p) for p in g["params"]}
            inter = ids & head_ids
            if inter and inter != ids:
                raise ValueError(
                    "head_lr_restart needs the head's parameters in their own optimizer "
                    "param group(s); this group mixes head and other parameters"
                )
            if inter:
                # the base LR travels with optimizer.state_dict(), as LR schedulers store it
                groups.append((g, float(g.setdefault("initial_lr", g["lr"]))))
        if not groups:
            raise ValueError("head_lr_restart: the head's parameters are not in the optimizer")
        return groups

    def _apply_head_lr(self, t: int) -> None:
        for start, end in self.schedule.periods():
            if start <= t < end:
                f = cosine_factor(t - start, end - start)
                # looked up again: optimizer.load_state_dict() replaces the param-group dicts
                for group, base in self._head_groups():
                    group["lr"] = base * f
                return

    # ------------------------------------------------------------------ state
    def state_dict(self, *, sum_ranks: bool = False, plain: bool = False) -> dict[str, Any]:
        """What a resume needs. Inside an epoch under DDP, pass ``sum_ranks=True`` on every rank
        (collective) so the saved state holds the open sums of all ranks, not only the saving rank's.
        The batch captured for the head signal travels as tensors, only when a re-init may follow;
        ``plain=True``: every tensor as nested lists (JSON-ready)."""
        pending = self._diag.pending_state() if self._diag is not None else None
        if pending is not None and pending["head_batch"] is not None and not self._next_may_fire():
            pending["head_batch"] = None  # the converged trigger decided no re-init at the next epoch
        state = {
            "version": STATE_VERSION,
            "unit": self.unit,
            "total": self.schedule.total,
            "reinits": self.schedule.reinits,
            "points": list(self.schedule.points),
            "applied": sorted(self.applied),
            "skipped": sorted(self.skipped),
            "done": self.done,  # read by version-1 code
            "init": self.init if isinstance(self.init, str) else None,
            "seed": self.seed,
            "started": self._started,
            "diagnosis": self.diagnosis,
            "diagnosis_pending": pending,
            # schedule runs: the state of before the trigger existed
            **(self._trigger.state_dict(self.schedule) if self._trigger is not None else {}),
        }
        state = open_sums_over_ranks(state) if sum_ranks else state
        return plain_state(state) if plain else state

    def _next_may_fire(self) -> bool:
        """False when the converged trigger has settled the epoch under way (its end: the checkpoint
        the trainers write) and will not fire at the next one; True otherwise."""
        trig = self._trigger
        if trig is None or trig.epoch is None or not trig.history or trig.history[-1][0] != trig.epoch:
            return True
        acc = trig.history[-1][1]
        return acc is not None and acc >= trig.converged_acc and trig.may_fire(trig.epoch + 1, self.schedule)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (every rank loads the same state: rank 0 keeps its open sums)."""
        state = open_sums_for_this_rank(state)
        saved = state.get("trigger", "schedule")
        if self._trigger is not None or saved != "schedule":
            if saved != self.trigger:
                raise ValueError(
                    f"RIFLE state was saved with trigger={saved!r}, this run has "
                    f"trigger={self.trigger!r}; resume with the same trigger"
                )
            assert self._trigger is not None  # saved == self.trigger != "schedule"
            self._trigger.load_state_dict(state, self.unit, self.schedule)
            self.schedule = dataclasses.replace(self.schedule, points=tuple(self._trigger.fired))
        elif list(state.get("points", [])) != list(self.schedule.points) or state.get("unit") != self.unit:
            raise ValueError(
                f"RIFLE state is for a different schedule ({state.get('unit')}s "
                f"{state.get('points')}) than this run ({self.unit}s {list(self.schedule.points)}); "
                f"resume with the same epochs/steps, reinits and guard"
            )
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"RIFLE state was saved with seed {state.get('seed')}, this run has seed {self.seed}"
            )
        if "applied" in state:
            applied = [int(i) for i in state["applied"]]
            skipped = [int(i) for i in state.get("skipped", [])]
        else:  # version 1: "done" did not tell applied from skipped
            applied, skipped = [int(i) for i in state["done"]], []
        pending = [i for i in range(1, len(self.schedule.points) + 1) if i not in applied + skipped]
        may_fire = False  # converged trigger: a re-init it may still fire draws with this run's init
        if self._trigger is not None:
            w = self._trigger.epoch
            may_fire = any(
                self._trigger.may_fire(t, self.schedule)
                for t in range(1 if w is None else w + 1, self.schedule.total)
            )
        saved_init = state.get("init", None)
        if isinstance(self.init, str) and (pending or may_fire):
            if "init" not in state and self.init in _RENAMED_INITS:
                raise ValueError(
                    f"RIFLE state version {state.get('version')} was saved when init={self.init!r} "
                    f"drew what is now init={_RENAMED_INITS[self.init]!r} (docs/rifle.md, "
                    f"Initialisers): resume with init={_RENAMED_INITS[self.init]!r} to draw the heads "
                    f"the run would have drawn (CLI: write {_RENAMED_INITS[self.init]} for "
                    f"{self.init} in the run's config.yaml, then --resume with --reinit-init "
                    f"{_RENAMED_INITS[self.init]})"
                )
            if isinstance(saved_init, str) and saved_init != self.init:
                raise ValueError(
                    f"RIFLE state was saved with init={saved_init!r}, this run has "
                    f"init={self.init!r}: the remaining re-inits would draw other heads"
                )
        self.applied, self.skipped = applied, skipped
        started = state.get("started")
        self._started, self._restored = (None if started is None else int(started)), True
        if self._diag is not None and "diagnosis" in state:
            self._diag.load_state_dict(state["diagnosis"])
            if state.get("diagnosis_pending"):
                self._diag.load_pending_state(state["diagnosis_pending"])

    def __repr__(self) -> str:
        if self.trigger == "converged":
            return (
                f"Rifle(head={self.module_names}, epochs={self.schedule.total}, trigger='converged', "
                f"converged_acc={self.converged_acc}, reinits={self.schedule.reinits}, "
                f"guard={self.schedule.guard}, fired={self.fired})"
            )
        return (
            f"Rifle(head={self.module_names}, {self.unit}s={self.schedule.total}, "
            f"reinits={self.schedule.reinits}, points={list(self.schedule.points)}, "
            f"applied={sorted(self.applied)}, skipped={sorted(self.skipped)})"
        )
