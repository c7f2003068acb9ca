"""What every part of :mod:`rifle.models` shares: the error type and the preprocessing record."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class ModelError(ValueError):
    """A model name, its weights or its options cannot be honoured."""


def _prep(mean, std) -> dict:
    return {
        "mean": tuple(float(v) for v in mean),
        "std": tuple(float(v) for v in std),
        "interpolation": "bilinear",
    }
