"""Standard fine-tuning (``--method finetune``): the baseline every other method is compared with.

A new random head and every layer trained with the run's recipe (the official RIFLE script's: SGD,
momentum 0.9, lr 0.01, weight decay 1e-4, one cosine over the run; REFERENCE.md §2). Nothing to add to
the trainer: the plug-in only makes the choice explicit and recorded. docs/methods.md "Standard
fine-tuning".
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register


@register("finetune")
@dataclass
class Finetune(Method):
    """Standard fine-tuning: a new random head, every layer trained (no extra hooks)."""

    kind = "method"
