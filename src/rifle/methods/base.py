"""The one protocol every fine-tuning method plugs into, and the registry the trainer builds from.

The trainer calls these hooks at fixed moments and never asks for a method by name:

================================  =====================================================================
``model_kwargs()``                   before the model is built: e.g. ``{"drop_path_rate": 0.1}``
``configure_param_groups(groups, ctx)``  before the optimizer exists: adjust weight decay / LR per group
``setup(model, optimizer, ctx)``    once, after the optimizer exists (and after resume state is loaded)
``on_epoch_start(epoch)``           before each epoch; returns a dict of events to log (e.g. reinit)
``on_step_start(step)``             before each optimizer step (global step index)
``on_batch_end(loss, correct, n)``  after each (micro-)batch's backward: mean loss, number correct (tensors)
``on_epoch_end(epoch)``             after the epoch's evaluation; returns fields for its metrics row
``transform_batch(x, y)``           before the forward (training only)
``loss_terms(logits, features, x, y)``  after the forward: named extra loss terms, summed into the loss
``lr_lambda(ctx)``                  optional per-epoch LR multiplier ``f(epoch)`` replacing the cosine
``state_dict()`` / ``load_state_dict()``  checkpoint and resume
``config()``                        hyper-parameters to record in config.yaml / summary.json
================================  =====================================================================

``features`` is the input of the classifier head (the pooled feature), captured by a hook.
A new method is one file with a subclass and a ``@register("name")`` line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class RunContext:
    """What a method may know about the run (filled by the trainer)."""

    epochs: int
    steps_per_epoch: int
    seed: int
    num_classes: int
    head: list[nn.Module]
    head_names: list[str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train_loader: Callable[[], Any] | None = None  # returns an iterator of (x, y) training batches
    pretrained_state: dict[str, torch.Tensor] | None = None  # the model's weights before training
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config (read-only)
    log: Callable[[str], None] = print


class Method:
    """Base class: every hook is a no-op. Subclasses set ``name`` and override what they need."""

    name: str = "method"
    kind: str = "method"  # "method" (finetune/rifle), "reg" (regulariser) or "trick"
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every method is a @dataclass (its options)

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def configure_param_groups(self, groups: list[dict], ctx: RunContext) -> list[dict]:
        return groups

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        return {}

    def on_step_start(self, step: int) -> None:
        pass

    def on_batch_end(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> dict[str, Any]:
        return {}

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def loss_terms(
        self, logits: torch.Tensor, features: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {}

    needs_features: bool = False
    needs_pretrained: bool = False  # reads ctx.pretrained_state (so a resume needs the pretrained weights)

    def lr_lambda(self, ctx: RunContext) -> Callable[[int], float] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def config(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registry() -> dict[str, type[Method]]:
    from . import _load_all  # noqa: F401  (import every method module once)

    return dict(_REGISTRY)


def create(name: str, **options: Any) -> Method:
    reg = registry()
    if name not in reg:
        import difflib

        close = difflib.get_close_matches(name, reg, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(reg))}")
    cls = reg[name]
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(
                f"method {name!r} has no option(s) {sorted(unknown)}; its options: {sorted(known) or 'none'}"
            )
        options = {
            k: _number(name, f, options[k]) for f in dataclasses.fields(cls) for k in [f.name] if k in options
        }
    return cls(**options)


def _number(method: str, f: dataclasses.Field, value: Any) -> Any:
    """An int / float option written as a string (YAML reads 1e-2 as one) or as a whole float, converted."""
    kind = str(f.type).split(" |")[0]
    if kind not in ("int", "float") or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(
            f"--{method}-{f.name.replace('_', '-')}={value!r} (options.{method}.{f.name}): "
            f"expected {'an integer' if kind == 'int' else 'a number'}"
        ) from None
    if kind == "float":
        return number
    if not number.is_integer():
        raise ValueError(
            f"--{method}-{f.name.replace('_', '-')}={value!r} (options.{method}.{f.name}): "
            f"expected an integer"
        )
    return int(number)
