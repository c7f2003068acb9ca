"""RIFLE in other trainers: thin adapters over :class:`rifle.core.Rifle`.

- :class:`rifle.integrations.lightning.RifleCallback`: a Lightning ``Callback``
  (``pip install rifle[lightning]``);
- :class:`rifle.integrations.transformers.RifleTrainerCallback`: a Hugging Face ``TrainerCallback``
  (``pip install rifle[transformers]``).

All semantics (schedule, guard, seeded in-place re-init, optimizer-state clearing, resume state) come
from the core; the adapters only translate the trainers' hooks and find the model and optimizer. This
package imports neither Lightning nor Transformers: ``import rifle`` / ``import rifle.integrations``
stay light, and the classes load on first attribute access.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["RifleCallback", "RifleTrainerCallback", "unwrap_optimizer", "check_trigger"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The plain ``torch.optim.Optimizer`` inside trainer wrappers.

    Accelerate's ``AcceleratedOptimizer`` (used by the HF Trainer) keeps the real optimizer in
    ``.optimizer``; Lightning's ``LightningOptimizer`` keeps it in ``._optimizer``. RIFLE clears the
    head's entries of the real optimizer's ``.state`` and, with ``head_lr_restart``, edits its
    ``param_groups``.
    """
    seen = 0
    while optimizer is not None and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            optimizer = inner
            seen += 1
            continue
        break
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"RIFLE: cannot find a torch optimizer inside {type(optimizer).__name__}")
    return optimizer


def check_trigger(trigger: str) -> None:
    """The callbacks re-initialise on RIFLE's schedule only; ``"converged"`` needs an accuracy they do not see."""
    if trigger == "converged":
        raise ValueError("trigger='converged' is not supported by the callbacks: they do not see the "
                         "model's predictions, so the training accuracy it decides from is unknown. Use "
                         "rifle.Rifle(..., trigger='converged') in your own loop and feed observe(loss, "
                         "correct=..., count=...), or the rifle train CLI (docs/rifle.md#trigger)")
    if trigger != "schedule":
        raise ValueError(f"trigger={trigger!r}: the callbacks support only 'schedule'")


def __getattr__(name: str) -> Any:  # lazy: importing this package must not import the frameworks
    if name == "RifleCallback":
        from .lightning import RifleCallback
        return RifleCallback
    if name == "RifleTrainerCallback":
        from .transformers import RifleTrainerCallback
        return RifleTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
