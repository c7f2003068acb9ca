"""Derive independent, reproducible random streams from a run seed and a few integers.

Every random stream of a run (split, data order, augmentation, dropout, re-init) is a pure function of
(run seed, purpose, index), so a resumed run and every DDP rank draw exactly what an uninterrupted
single-process run draws (REFERENCE.md §3.8, §3.12).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str, *index: int) -> int:
    """A 63-bit seed from ``(seed, purpose, *index)``; stable across processes and Python versions."""
    text = ":".join([str(int(seed)), purpose, *(str(int(i)) for i in index)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, purpose: str, *index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *index))
