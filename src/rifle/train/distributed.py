"""torch.distributed under ``torchrun``: detection, process group, reductions.

``torchrun --nproc_per_node=N -m rifle train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
``rifle train`` then trains data-parallel (DDP): each rank sees a disjoint shard of every epoch's
permutation, evaluation counts are summed across ranks (exact), and only rank 0 writes files.
"""

from __future__ import annotations

import gc
import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op when alone."""
    world = env_world_size()
    if world < 2:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over ranks (float64; exact for counts):
    :func:`rifle.core.replicas.sum_over_ranks`."""
    from ..core.replicas import sum_over_ranks

    return sum_over_ranks(values) if info.enabled else values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's (picklable) object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo, failure: BaseException | None = None) -> None:
    """Leave the process group. The DDP wrapper holds the group's C++ object: it is freed first (with
    the frames of ``failure``'s traceback, which keep it alive after an error), so the group is destroyed
    while the interpreter is whole; a gloo group freed during interpreter finalisation can abort the
    process (SIGABRT, "terminate called without an active exception")."""
    if failure is not None:
        traceback.clear_frames(failure.__traceback__)
    gc.collect()
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
