"""Models from timm (any name it knows, ``hf-hub:`` / ``local-dir:`` included) and torchvision
classifiers (``torchvision:<name>``), each with a fresh ``num_classes``-way head.

Follows ``timm.create_model`` and ``torchvision.models.get_model``; unreachable weights hosts fail at
once (:mod:`rifle.models.offline`).
"""

from __future__ import annotations

import contextlib
import warnings

from typing import Any, cast

from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, ModelError, _prep
from .offline import _hf_offline, _no_network, _offline_error, _timm_offline, _torchvision_offline


def _is_timm_name(name: str) -> bool:
    import timm

    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return True
    return timm.is_model(name)


def _create_timm(
    name: str, num_classes: int, pretrained: bool, drop_rate: float, drop_path_rate: float
) -> nn.Module:
    import timm
    from timm.models import is_model_pretrained, split_model_name_tag

    local = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if pretrained and not local and not is_model_pretrained(name):
        raise ModelError(
            f"timm has no pretrained weights for {name}: use pretrained=False (--no-pretrained) "
            f"or a model from timm.list_models(pretrained=True)"
        )
    kw: dict[str, Any] = (
        {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    )  # not every timm model has it
    offline = _timm_offline(name) if pretrained and not name.startswith("local-dir:") else None
    try:
        with _hf_offline() if offline else contextlib.nullcontext():
            model: Any = timm.create_model(
                name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **kw
            )
    except TypeError as e:
        raise ModelError(
            f"timm model {name} rejected the options drop_rate={drop_rate}, "
            f"drop_path_rate={drop_path_rate}: {e}"
        ) from e
    except Exception as e:  # noqa: BLE001 - download / hub / cache errors come in many types
        if offline:
            raise _no_network(name, *offline) from None
        if pretrained:
            raise _offline_error(name, e) from e
        raise
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if pretrained:
        arch, tag = split_model_name_tag(name)
        weights = cfg.get("hf_hub_id") or (f"{arch}.{tag}" if tag else arch)
        model.rifle_pretrained_source = f"timm {timm.__version__}: {weights}"
    model.rifle_preprocessing = _prep(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    return model


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _replace_module(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)  # works for nn.Sequential indices too ("classifier.3")


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(old, nn.Conv2d):  # SqueezeNet's 1x1 conv classifier
        k = cast("tuple[int, int]", old.kernel_size)  # Conv2d's own 2-tuples, typed tuple[int, ...]
        s = cast("tuple[int, int]", old.stride)
        pad = cast("str | tuple[int, int]", old.padding)
        return nn.Conv2d(old.in_channels, num_classes, k, s, pad, bias=old.bias is not None)
    raise ModelError(f"cannot replace a {type(old).__name__} classification head")


def _torchvision_head_name(model: nn.Module) -> str:
    from ..core.structure import find_head, head_names

    for name in ("fc", "heads.head"):
        try:
            if isinstance(model.get_submodule(name), nn.Linear):
                return name
        except AttributeError:
            pass
    clf = getattr(model, "classifier", None)
    if isinstance(clf, nn.Sequential) and isinstance(clf[-1], (nn.Linear, nn.Conv2d)):
        return f"classifier.{len(clf) - 1}"
    if isinstance(clf, nn.Sequential) and len(clf) > 1 and isinstance(clf[1], nn.Conv2d):
        return "classifier.1"  # SqueezeNet: Dropout, Conv2d, ReLU, AdaptiveAvgPool2d
    try:
        return head_names(model, find_head(model))[0]
    except ValueError as e:
        raise ModelError(f"cannot find the classification head of {type(model).__name__}: {e}") from e


def _create_torchvision(
    name: str, num_classes: int, pretrained: bool, drop_rate: float, drop_path_rate: float
) -> nn.Module:
    import torchvision

    kw = {"stochastic_depth_prob": drop_path_rate} if drop_path_rate else {}
    if pretrained:
        _torchvision_offline(name, torchvision.models.get_model_weights(name).DEFAULT.url)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    except TypeError as e:
        if kw:
            raise ModelError(
                f"torchvision:{name} has no stochastic depth (drop_path_rate): use "
                f"drop_path_rate=0 or a timm model [{e}]"
            ) from e
        raise
    except Exception as e:  # noqa: BLE001 - urllib / hash / cache errors
        if pretrained:
            raise _offline_error(f"torchvision:{name}", e) from e
        raise
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        model.rifle_pretrained_source = f"torchvision {torchvision.__version__}: {weights}"
    head = _torchvision_head_name(model)
    _replace_module(model, head, _new_head(model.get_submodule(head), num_classes))
    for aux in ("AuxLogits.fc", "aux1.fc2", "aux2.fc2"):  # Inception v3 / GoogLeNet auxiliary heads
        try:
            old = model.get_submodule(aux)
        except AttributeError:
            continue
        _replace_module(model, aux, _new_head(old, num_classes))
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    if drop_rate:
        # torchvision's classifier dropout (where it has one) keeps its own default unless drop_rate > 0
        parent = model.get_submodule(head.rpartition(".")[0]) if "." in head else None
        drops = [m for m in parent.modules() if isinstance(m, nn.Dropout)] if parent is not None else []
        for m in drops:
            m.p = float(drop_rate)
        if not drops:
            warnings.warn(
                f"torchvision:{name} has no dropout before its classifier: drop_rate={drop_rate} "
                f"is ignored (use a timm model for head dropout)",
                stacklevel=3,
            )
    model.rifle_preprocessing = _prep(IMAGENET_MEAN, IMAGENET_STD)
    return model
