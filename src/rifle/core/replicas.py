"""Across data-parallel ranks: check that every replica holds the same tensors (cheap checksum
all-gather), and sum or gather a few numbers (the diagnosis, the converged trigger, the trainer).

DDP synchronises weights only when it wraps the model; a re-init drawn differently on one rank makes
the replicas diverge silently (REFERENCE.md §5). After every re-init, and at the end of a run, each
rank computes a checksum of the relevant parameters and all ranks compare them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


class ReplicaDivergenceError(RuntimeError):
    """Data-parallel replicas hold different values where they must be identical."""


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    """Where a collective's tensors live: the current GPU under NCCL, else the CPU (gloo)."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers per call: the plain sum and a position-weighted sum of all values."""
    total = torch.zeros(2, dtype=torch.float64)
    for t in tensors:
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(9973).add_(1)
        total[0] += flat.sum()
        total[1] += (flat * weights).sum()
    return total


def verify_replicas(tensors: Iterable[torch.Tensor], what: str) -> list[list[float]]:
    """All-gather checksums; raise :class:`ReplicaDivergenceError` naming the ranks that differ.

    A no-op (returns ``[]``) outside an initialised process group of more than one rank.
    """
    if distributed_world() < 2:
        return []
    local = checksum(tensors)
    device = _collective_device()
    gathered = [torch.zeros_like(local, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local.to(device))
    sums = [g.cpu().tolist() for g in gathered]
    bad = [r for r, s in enumerate(sums) if s != sums[0]]
    if bad:
        raise ReplicaDivergenceError(
            f"{what}: data-parallel replicas differ (ranks {bad} vs rank 0; checksums {sums}). Every "
            f"rank must draw the same values - use the same seed on every rank"
        )
    return sums


def sum_over_ranks(values: list[float]) -> list[float]:
    """Sum over data-parallel ranks (no-op alone); every rank calls it at the same re-init."""
    if distributed_world() < 2:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_over_ranks(obj: Any) -> list[Any]:
    """``[obj of rank 0, rank 1, ...]`` (``[obj]`` alone); every rank calls it at the same moment."""
    if distributed_world() < 2:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def open_sums_over_ranks(state: dict[str, Any]) -> dict[str, Any]:
    """A :meth:`rifle.core.Rifle.state_dict` with the sums still open inside an epoch summed over the
    data-parallel ranks (collective: every rank calls it at that checkpoint): the trigger's (correct,
    count) of the epoch so far and the diagnosis' unsettled loss window. No-op alone."""
    if distributed_world() == 1:
        return state
    window = state.get("trigger_window")
    pending = state.get("diagnosis_pending")
    k = _settled_rows(pending)
    rows = pending["obs"][k:] if pending else []
    values = (
        [float(window["correct"]), float(window["count"]), 0.0 if window["has"] else 1.0] if window else []
    )
    for loss_sum, correct, n, _ in rows:
        values += [float(loss_sum), float(correct or 0.0), float(n)]
    if not values:
        return state
    total = sum_over_ranks(values)
    state = dict(state)
    if window:
        correct, count, missing = total[:3]
        state["trigger_window"] = {
            **window,
            "correct": correct,
            "count": int(round(count)),
            "has": missing == 0,
        }
        total = total[3:]
    if rows:
        assert pending is not None  # rows come from it
        state["diagnosis_pending"] = {
            **pending,
            "obs": pending["obs"][:k]
            + [
                [
                    total[3 * i],
                    None if row[1] is None else total[3 * i + 1],
                    int(round(total[3 * i + 2])),
                    row[3],
                ]
                for i, row in enumerate(rows)
            ],
        }
    return state


def _settled_rows(pending: dict[str, Any] | None) -> int:
    """How many leading rows of a saved loss window hold sums over ranks already (Diagnosis.settle)."""
    if not pending or not pending.get("obs"):
        return 0
    k = pending.get("settled_rows")  # states before it: all rows or none
    return int(k) if k is not None else len(pending["obs"]) if pending.get("settled") else 0


def open_sums_for_this_rank(state: dict[str, Any]) -> dict[str, Any]:
    """A saved state's open sums for this rank: rank 0 keeps them (all ranks' when saved with
    :func:`open_sums_over_ranks`), the other ranks go on from zero, so the sum over ranks at the
    epoch's end (or at the re-init) counts them once."""
    if _rank() == 0:
        return state
    state = dict(state)
    window = state.get("trigger_window")
    if window:
        state["trigger_window"] = {**window, "correct": 0.0, "count": 0}
    pending = state.get("diagnosis_pending")
    k = _settled_rows(pending)
    if pending and len(pending["obs"]) > k:
        state["diagnosis_pending"] = {
            **pending,
            "obs": pending["obs"][:k]
            + [[0.0, None if c is None else 0.0, 0, key] for _, c, _, key in pending["obs"][k:]],
        }
    return state
