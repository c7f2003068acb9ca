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

__all__ = ["RifleCallback", "RifleTrainerCallback", "unwrap_optimizer", "check_trigger",
           "reduce_open_sums", "localize_open_sums", "diagnosis_metrics"]


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
        raise ValueError(f"trigger={trigger!r}: choose 'schedule' (the paper's fixed re-init points) or "
                         f"'converged' (re-init once the head has converged; docs/rifle.md#trigger)")
    if granularity is None:
        granularity = "epoch" if trigger == "converged" else default
    if granularity not in ("epoch", "step"):
        raise ValueError(f"granularity must be 'epoch' or 'step', got {granularity!r}")
    if trigger == "converged" and granularity == "step":
        raise ValueError("trigger='converged' decides once per epoch from the epoch's training accuracy: "
                         "use granularity='epoch' (step granularity is not supported with it)")
    return granularity


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_open_sums(state: dict[str, Any]) -> dict[str, Any]:
    """The core's state with the sums still open inside an epoch summed over data-parallel ranks, for a
    checkpoint written there (collective: every rank calls it at that checkpoint): the trigger's
    (correct, count) of the epoch so far and the diagnosis' unsettled loss window. No-op alone."""
    if _rank_world()[1] == 1:
        return state
    from ..core.replicas import sum_over_ranks
    window = state.get("trigger_window")
    pending = state.get("diagnosis_pending")
    rows = pending["obs"] if pending and not pending.get("settled") else []
    values = [float(window["correct"]), float(window["count"]), 0.0 if window["has"] else 1.0] if window else []
    for loss_sum, correct, n, _ in rows:
        values += [float(loss_sum), float(correct or 0.0), float(n)]
    if not values:
        return state
    total = sum_over_ranks(values)
    state = dict(state)
    if window:
        correct, count, missing = total[:3]
        state["trigger_window"] = {**window, "correct": correct, "count": int(round(count)),
                                   "has": missing == 0}
        total = total[3:]
    if rows:
        state["diagnosis_pending"] = {**pending, "obs": [
            [total[3 * i], None if row[1] is None else total[3 * i + 1], int(round(total[3 * i + 2])), row[3]]
            for i, row in enumerate(rows)]}
    return state


def localize_open_sums(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's open sums for this rank: under DDP the saved sums (of all ranks, see
    :func:`reduce_open_sums`) stay on rank 0 and the other ranks go on from zero, so the core's
    sum over ranks (at the epoch's end, or at the re-init) counts them once."""
    if _rank_world()[0] == 0:
        return state
    state = dict(state)
    window = state.get("trigger_window")
    if window:
        state["trigger_window"] = {**window, "correct": 0.0, "count": 0}
    pending = state.get("diagnosis_pending")
    if pending and not pending.get("settled") and pending.get("obs"):
        state["diagnosis_pending"] = {**pending, "obs": [[0.0, None if c is None else 0.0, 0, key]
                                                         for _, c, _, key in pending["obs"]]}
    return state


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
