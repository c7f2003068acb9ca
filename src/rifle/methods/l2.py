"""L2: plain weight decay towards zero on every parameter - the standard fine-tuning baseline.

The optimizer's ``weight_decay`` (``--weight-decay``, default 1e-4 as in the official RIFLE recipe)
does the work; this plug-in only makes ``--reg l2`` an explicit, recorded choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register


@register("l2")
@dataclass
class L2(Method):
    """Weight decay towards zero (set with --weight-decay)."""

    kind = "reg"
