"""LP-FT: linear-probe the new head on the frozen backbone, then fine-tune everything (``--method lp-ft``).

Paper: Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022, arXiv 2202.10054. Rule and this project's decisions
(probe length, freezing, LR schedule, optimizer state, resume): docs/methods.md "LP-FT".

Epochs ``[0, P)`` are the probe: the backbone's LR is 0, every backbone module is in eval mode (BatchNorm
uses and keeps its pretrained statistics) and, in a single process with a one-module head, the head's
input is detached so no gradient reaches the backbone. Epochs ``[P, E)`` fine-tune every layer from a
clean optimizer state. Everything is a function of the epoch: no state to checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.reinit import clear_optimizer_state
from .base import Method, RunContext, register

SCHEDULES = ("restart", "global")


def default_probe_epochs(epochs: int) -> int:
    """``ceil(E/4)``, at most ``E - 1`` (at least one fine-tuning epoch)."""
    return min(math.ceil(epochs / 4), epochs - 1)


def phase_factor(epoch: int, epochs: int, probe: int, lr_schedule: str) -> float:
    """LR multiplier of ``epoch`` when the run's schedule restarts in each phase (``restart``):
    the run's cosine over ``[0, P)`` for the probe, then over ``[P, E)`` for the fine-tuning."""
    if lr_schedule == "constant":
        return 1.0
    start, length = (0, probe) if epoch < probe else (probe, epochs - probe)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / length))


@register("lp-ft")
@dataclass
class LPFT(Method):
    """Linear probe (frozen backbone) for probe_epochs, then fine-tune every layer (Kumar et al. 2022)."""

    probe_epochs: int | None = None  # None: ceil(E/4), at most E - 1
    schedule: str = "restart"  # restart: the run's LR schedule restarts at the FT phase; global

    kind = "method"
    option_help = {
        "probe_epochs": "epochs of linear probing (backbone frozen, BatchNorm in eval mode) before "
        "fine-tuning everything (default ceil(E/4), at most E-1)",
        "schedule": "restart: the run's LR schedule (cosine) runs once over the probe and again over the "
        "fine-tuning phase (Kumar et al.); global: one schedule over the whole run "
        "(default restart)",
    }

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"lp-ft schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r} "
                f"(--lp-ft-schedule)"
            )
        if self.probe_epochs is not None and (
            isinstance(self.probe_epochs, bool)
            or not isinstance(self.probe_epochs, int)
            or self.probe_epochs < 1
        ):
            raise ValueError(f"--lp-ft-probe-epochs={self.probe_epochs!r}: must be an integer >= 1")
        self._probe: int | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._frozen_modules: list[nn.Module] = []
        self._backbone_params: list[torch.Tensor] = []
        self._probing = False
        self._detach = False

    # ------------------------------------------------------------------ plan
    def resolve_probe(self, epochs: int) -> int:
        probe = default_probe_epochs(epochs) if self.probe_epochs is None else self.probe_epochs
        if not 1 <= probe < epochs:
            given = (
                f"--lp-ft-probe-epochs={self.probe_epochs}"
                if self.probe_epochs is not None
                else f"the default probe of ceil(E/4) = {probe} epoch(s)"
            )
            raise ValueError(
                f"lp-ft: {given} leaves no fine-tuning epoch in --epochs={epochs}; "
                f"use 1 <= probe epochs < epochs (LP-FT needs --epochs >= 2)"
            )
        return probe

    def lr_lambda(self, ctx: RunContext) -> Callable[[int], float] | None:
        probe = self.resolve_probe(ctx.epochs)  # validated before training starts
        if self.schedule == "global":
            return None
        epochs, lr_schedule = ctx.epochs, str(ctx.config.get("lr_schedule", "cosine"))
        return lambda e: phase_factor(e, epochs, probe, lr_schedule)

    # ------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        self._probe = self.resolve_probe(ctx.epochs)
        self._optimizer = optimizer
        head_modules = {id(m) for h in ctx.head for m in h.modules()}
        ancestors = {
            id(m)
            for name, m in model.named_modules()
            if any(h is sub for h in ctx.head for sub in m.modules())
        }
        # every module outside the head; the head's ancestors (containers, the root) keep their mode:
        # their flag only drives head-side code such as functional dropout before the classifier
        self._frozen_modules = [
            m for m in model.modules() if id(m) not in head_modules and id(m) not in ancestors
        ]
        head_ids = {id(p) for h in ctx.head for p in h.parameters()}
        self._backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
        # no gradient to the backbone at all (saves its backward pass) where that is safe: DDP expects a
        # gradient for every parameter, torch.compile would retrace, and a multi-module head would be cut
        self._detach = (
            len(ctx.head) == 1
            and int(ctx.config.get("world_size") or 1) == 1
            and not ctx.config.get("compile")
        )
        if self._detach:
            ctx.head[0].register_forward_pre_hook(self._detach_input)
        ctx.log(
            f"LP-FT: linear probe of {ctx.head_names} for epoch(s) 0-{self._probe - 1} (backbone frozen, "
            f"in eval mode), then fine-tuning of every layer for epoch(s) {self._probe}-{ctx.epochs - 1} "
            f"(LR schedule: {self.schedule})"
        )

    def _detach_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self._probing:
            return None
        return (args[0].detach(), *args[1:])

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        assert self._probe is not None and self._optimizer is not None, "setup() first"
        self._probing = epoch < self._probe
        backbone_ids = {id(p) for p in self._backbone_params}
        if self._probing:
            for g in self._optimizer.param_groups:  # lr 0: neither gradients nor weight decay move it
                if any(id(p) in backbone_ids for p in g["params"]):
                    if not all(id(p) in backbone_ids for p in g["params"]):
                        raise ValueError(
                            "lp-ft: a parameter group mixes backbone and head parameters; "
                            "the probe cannot freeze the backbone alone"
                        )
                    g["lr"] = 0.0
        elif epoch == self._probe:
            # the fine-tuning phase starts from a clean optimizer (Kumar et al.: a new optimizer),
            # for the backbone and the probed head alike: per-parameter state and the per-group step
            # counts (timm's Adan/Lamb bias corrections), as the re-init resets them
            self._optimizer.state.clear()
            clear_optimizer_state(
                self._optimizer, [p for g in self._optimizer.param_groups for p in g["params"]]
            )
        return {"lp_ft_phase": "probe" if self._probing else "finetune"}

    def on_step_start(self, step: int) -> None:
        if self._probing:  # after the trainer's model.train(): the features are the pretrained ones
            for m in self._frozen_modules:
                m.training = False

    def config(self) -> dict[str, Any]:
        """The options; after setup, ``probe_epochs`` is the resolved probe length."""
        return {
            "probe_epochs": self._probe if self._probe is not None else self.probe_epochs,
            "schedule": self.schedule,
        }
