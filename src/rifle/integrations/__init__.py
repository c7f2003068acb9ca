"""RIFLE in other trainers: thin adapters over :class:`rifle.core.Rifle` (RIFLE: Li, Xiong, An, Xu, Dou,
"RIFLE: Backpropagation in Depth for Deep Transfer Learning through Re-Initializing the Fully-connected
LayEr", ICML 2020, arXiv 2007.03349).

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

__all__ = ["RifleCallback", "RifleTrainerCallback", "unwrap_optimizer", "check_trigger", "diagnosis_metrics"]


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


def check_trigger(trigger: str, granularity: str | None, default: str) -> str:
    """Validate ``trigger`` and return the granularity: ``None`` means ``default``, or ``"epoch"`` for
    ``trigger="converged"`` (it decides once per epoch from the epoch's training accuracy)."""
    if trigger not in ("schedule", "converged"):
        raise ValueError(
            f"trigger={trigger!r}: choose 'schedule' (the paper's fixed re-init points) or "
            f"'converged' (re-init once the head has converged; docs/rifle.md#trigger)"
        )
    if granularity is None:
        granularity = "epoch" if trigger == "converged" else default
    if granularity not in ("epoch", "step"):
        raise ValueError(f"granularity must be 'epoch' or 'step', got {granularity!r}")
    if trigger == "converged" and granularity == "step":
        raise ValueError(
            "trigger='converged' decides once per epoch from the epoch's training accuracy: "
            "use granularity='epoch' (step granularity is not supported with it)"
        )
    return granularity


def diagnosis_metrics(entry: dict[str, Any]) -> dict[str, float | int]:
    """The numbers of one diagnosis entry (:attr:`rifle.core.Rifle.diagnosis`) as ``rifle/...``
    metrics for a trainer's loggers: ``rifle/diagnosis_of`` (the re-init's index), ``rifle/grad_ratio``
    and its ``_first`` / ``_middle`` / ``_last`` backbone thirds, ``rifle/train_loss_before``,
    ``rifle/train_acc_before``, ``rifle/head_norm_before`` / ``_after``; unmeasured ones left out."""
    out: dict[str, float | int] = {"rifle/diagnosis_of": int(entry["index"])}
    for key in ("grad_ratio", "train_loss_before", "train_acc_before", "head_norm_before", "head_norm_after"):
        if entry.get(key) is not None:
            out[f"rifle/{key}"] = float(entry[key])
    for name, value in zip(("first", "middle", "last"), entry.get("grad_ratio_thirds") or ()):
        out[f"rifle/grad_ratio_{name}"] = float(value)
    return out


def __getattr__(name: str) -> Any:  # lazy: importing this package must not import the frameworks
    if name == "RifleCallback":
        from .lightning import RifleCallback

        return RifleCallback
    if name == "RifleTrainerCallback":
        from .transformers import RifleTrainerCallback

        return RifleTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
