"""What a model is made of: its classifier head, its blocks and stages, and the layers methods act on.

The one place that walks a model's structure, for every method (RIFLE's head and ``--reinit-modules``,
DELTA's feature layers, stochastic depth's residual blocks, the L2-SP/DELTA head term) and for the
analysis (conv / linear weight layers). Models are recognised by the layouts of timm and torchvision
(and Hugging Face's ``classifier`` / ``score``); anything else can be named explicitly.

Callers pass the user's module (:func:`rifle.core.unwrap_model` looks through DDP / compile wrappers).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

HeadSpec = nn.Module | str | Sequence[nn.Module | str]

_KNOWN_NAMES = ("fc", "heads.head", "head.fc", "head", "classifier", "heads", "score", "last_linear")

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # the weight layers of weight_layers()


def has_params(module: nn.Module, recurse: bool = True) -> bool:
    """Whether ``module`` has any parameter (``recurse=False``: of its own, not its submodules')."""
    return any(True for _ in module.parameters(recurse=recurse))


# --------------------------------------------------------------------------------------- the head
def _last_linear(m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.Linear):
        return m
    last = None
    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    return last


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, sub in model.named_modules():
        if sub is module:
            return name or "<model>"
    raise ValueError(f"the head module {type(module).__name__} is not a submodule of the model")


def _resolve_one(model: nn.Module, spec: nn.Module | str) -> nn.Module:
    if isinstance(spec, str):
        try:
            return model.get_submodule(spec)
        except AttributeError:
            raise ValueError(
                f"head={spec!r}: no such submodule in {type(model).__name__}; "
                f"Linear/Conv layers: {', '.join(linear_conv_names(model)) or 'none'}"
            ) from None
    if isinstance(spec, nn.Module):
        _module_name(model, spec)  # raises when foreign
        return spec
    raise TypeError(f"head must be a module, a dotted name or a list of them, got {type(spec).__name__}")


def linear_conv_names(model: nn.Module) -> list[str]:
    """Dotted names of the ``nn.Linear`` and ``nn.Conv2d`` layers: the candidates an error offers for
    ``head=...`` (a head is a Linear, or a 1x1 conv as in SqueezeNet)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def _auto(model: nn.Module) -> list[nn.Module]:
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            clf = get_classifier()
        except Exception:  # noqa: BLE001 - a model's own accessor may not apply
            clf = None
        mods = list(clf) if isinstance(clf, (tuple, list)) else [clf]
        mods = [m for m in mods if isinstance(m, nn.Module) and has_params(m)]
        if mods:
            return mods
    for name in _KNOWN_NAMES:
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            continue
        lin = _last_linear(sub)
        if lin is not None:
            return [lin]
    if isinstance(model, nn.Sequential):
        lin = _last_linear(model)
        if lin is not None:
            return [lin]
    raise ValueError(
        f"could not find the classifier head of {type(model).__name__}: no get_classifier(), "
        f"none of the attributes {', '.join(_KNOWN_NAMES)}. Name it explicitly, e.g. "
        f"head=model.my_head or head='my_head' (CLI: --head my_head). Linear/Conv layers in this "
        f"model: {', '.join(linear_conv_names(model)[-8:]) or 'none'}"
    )


def find_head(model: nn.Module, head: HeadSpec | None = None) -> list[nn.Module]:
    """Return the head module(s) to re-initialise; raises ``ValueError`` with guidance when unclear.

    Resolution order:

    1. an explicit module, a dotted name (``"fc"``, ``"classifier.1"``) or a list of either;
    2. timm's ``get_classifier()`` (a module, or a tuple for distilled models);
    3. well-known attribute names: torchvision ResNet ``fc``; VGG / MobileNet / EfficientNet / ConvNeXt
       ``classifier`` (its last ``Linear``); ViT ``heads.head``; Hugging Face ``classifier`` / ``score``;
    4. an ``nn.Sequential`` model: its last ``Linear``.

    A model whose head cannot be found gets an error listing its Linear/Conv layers and how to name one.
    """
    if head is None:
        mods = _auto(model)
    elif isinstance(head, (str, nn.Module)):
        mods = [_resolve_one(model, head)]
    else:
        mods = [_resolve_one(model, h) for h in head]
        if not mods:
            raise ValueError("head=[] names no module to re-initialise")
    for m in mods:
        if not has_params(m):
            raise ValueError(
                f"the head {_module_name(model, m)!r} ({type(m).__name__}) has no parameters: nothing "
                f"to re-initialise. Pass the Linear layer that produces the logits as head=..."
            )
    return mods


def head_names(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    return [_module_name(model, m) for m in modules]


def in_head(name: str, heads: Sequence[str]) -> bool:
    """Whether the dotted module/parameter ``name`` is one of the head modules ``heads`` or inside one."""
    return any(name == h or name.startswith(h + ".") for h in heads)


def head_params(head: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Trainable parameters of the head modules (deduplicated, in order)."""
    return list(dict.fromkeys(p for m in head for p in m.parameters() if p.requires_grad))


# ------------------------------------------------------------------------------ blocks and stages
def backbone_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks in depth order: timm ``blocks`` (stages flattened), ResNet ``layer1..4``,
    timm ``stages.*.blocks`` (ConvNeXt & co.); ``[]`` for any other layout."""
    out: list[tuple[str, nn.Module]] = []
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        for name, stage in blocks.named_children():
            if isinstance(stage, nn.Sequential):
                out += [(f"blocks.{name}.{n}", b) for n, b in stage.named_children()]
            else:
                out.append((f"blocks.{name}", stage))
        return out
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        seq = getattr(model, layer, None)
        if isinstance(seq, nn.Sequential):
            out += [(f"{layer}.{n}", b) for n, b in seq.named_children()]
    stages = getattr(model, "stages", None)
    if not out and isinstance(stages, nn.Sequential):  # timm ConvNeXt & co.
        for name, stage in stages.named_children():
            stage_blocks = getattr(stage, "blocks", None)
            if isinstance(stage_blocks, nn.Sequential):
                out += [(f"stages.{name}.blocks.{n}", b) for n, b in stage_blocks.named_children()]
    return out


def select_modules(model: nn.Module, spec: str) -> list[nn.Module]:
    """Modules to re-initialise besides the head (``--reinit-modules``).

    * ``"last:N"`` - the last N blocks of the backbone (timm ``blocks`` / ``stages``, ResNet
      ``layer1..layer4``), e.g. ``last:1`` = the block just below the pooling;
    * anything else is a regular expression matched (``re.fullmatch``) against dotted module names,
      e.g. ``"layer4\\.2\\..*"`` or ``"blocks\\.6.*"``; nested matches are collapsed to the outermost.
    """
    spec = spec.strip()
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            raise ValueError(f"--reinit-modules {spec!r}: expected last:N with an integer N") from None
        found = backbone_blocks(model)
        if not found:
            raise ValueError(
                f"--reinit-modules {spec!r}: no block structure known for "
                f"{type(model).__name__}; give a regular expression over module names"
            )
        if not 1 <= n <= len(found):
            raise ValueError(
                f"--reinit-modules {spec!r}: N must be in 1..{len(found)} (blocks: "
                f"{', '.join(name for name, _ in found[-4:])} ...)"
            )
        return [m for _, m in found[-n:]]
    try:
        pattern = re.compile(spec)
    except re.error as e:
        raise ValueError(f"--reinit-modules {spec!r}: not a valid regular expression ({e})") from None
    chosen: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if (
            name
            and pattern.fullmatch(name)
            and has_params(m)
            and not any(name.startswith(c + ".") for c, _ in chosen)
        ):
            chosen.append((name, m))
    if not chosen:
        names = [n for n, m in model.named_modules() if n and has_params(m, recurse=False)]
        raise ValueError(
            f"--reinit-modules {spec!r} matches no module with parameters; module names "
            f"look like: {', '.join(names[-6:])}"
        )
    return [m for _, m in chosen]


class DropSite(NamedTuple):
    """Where a residual block's branch can be dropped (stochastic depth sets the rate there)."""

    kind: str  # "slot": a timm-style drop-path attribute of the block; "branch_end": a
    #                    torchvision ResNet block's last BatchNorm; "stochastic_depth": a torchvision
    #                    StochasticDepth layer
    module: nn.Module  # the block ("slot"), the BatchNorm or the StochasticDepth layer
    attr: str = ""  # "slot": the attribute's name (drop_path, drop_path1, drop_path2)


DROP_PATH_SLOTS = ("drop_path", "drop_path1", "drop_path2")


def residual_blocks(model: nn.Module) -> list[tuple[str, list[DropSite]]]:
    """``[(block name, [drop sites])]``: the residual blocks whose branch can be dropped, in module order.

    Blocks without an identity path (timm EfficientNet's ``has_skip=False``, torchvision's
    ``use_res_connect=False``) are left out. Recognised: blocks with timm-style drop-path slots
    (``drop_path`` / ``drop_path1`` / ``drop_path2`` holding a ``DropPath`` or ``Identity``, or ``None``
    on a timm ResNet block), torchvision ResNet ``BasicBlock`` / ``Bottleneck`` (the branch ends in
    ``bn2`` / ``bn3``) and torchvision ``StochasticDepth`` children.
    """
    from timm.layers import DropPath
    from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck
    from torchvision.ops import StochasticDepth

    try:
        from timm.models.resnet import BasicBlock as TimmBasic, Bottleneck as TimmBottleneck

        timm_resnet: tuple[type, ...] = (TimmBasic, TimmBottleneck)
    except ImportError:  # pragma: no cover - timm layout change
        timm_resnet = ()
    found: dict[str, list[DropSite]] = {}
    for name, m in model.named_modules():
        if getattr(m, "has_skip", True) is False or getattr(m, "use_res_connect", True) is False:
            continue  # no identity path: the branch cannot be dropped
        if isinstance(m, (TvBasic, TvBottleneck)):
            found[name] = [DropSite("branch_end", m.bn3 if isinstance(m, TvBottleneck) else m.bn2)]
            continue
        for attr in DROP_PATH_SLOTS:
            slot = getattr(m, attr, "absent")
            if isinstance(slot, (DropPath, nn.Identity)) or (
                slot is None and timm_resnet and isinstance(m, timm_resnet)
            ):
                found.setdefault(name, []).append(DropSite("slot", m, attr))
        for child in m.children():
            if isinstance(child, StochasticDepth):
                found.setdefault(name, []).append(DropSite("stochastic_depth", child))
    return list(found.items())


# ------------------------------------------------------------------------- DELTA's feature layers
def default_layers(model: nn.Module) -> list[str]:
    """Automatic feature layers (DELTA): the last block of each ResNet stage (``layer1..4``), the last
    block of each of the last four stages of timm ``blocks``-style models (EfficientNet, MobileNet), the
    last four ``stages`` of stage-based timm models, the last four blocks of a flat ``blocks``.
    ``ValueError`` when the model is not recognised."""
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    seqs = [s for s in stages if isinstance(s, nn.Sequential) and len(s)]
    if len(seqs) == 4:  # timm / torchvision ResNet
        return [f"layer{i}.{len(s) - 1}" for i, s in enumerate(seqs, start=1)]
    seq = getattr(model, "blocks", None)
    if isinstance(seq, nn.Sequential) and len(seq):
        subs = [b for b in seq if isinstance(b, nn.Sequential)]
        if len(subs) == len(seq):  # EfficientNet / MobileNet stages
            return [f"blocks.{i}.{len(b) - 1}" for i, b in enumerate(subs) if len(b)][-4:]
        return [f"blocks.{i}" for i in range(len(seq))][-4:]
    st = getattr(model, "stages", None)
    if isinstance(st, nn.Sequential) and len(st):
        return [f"stages.{i}" for i in range(len(st))][-4:]
    raise ValueError(
        f"DELTA has no default layers for {type(model).__name__}: name them with --delta-layers "
        f"(comma-separated). Candidates: {', '.join(candidate_layers(model)) or 'none'}"
    )


def candidate_layers(model: nn.Module, exclude: Sequence[str] = (), limit: int = 60) -> list[str]:
    """Names of the model's blocks/stages (modules with children and parameters), ``exclude``'s left out."""
    names = [
        n
        for n, sub in model.named_modules()
        if n and not in_head(n, exclude) and any(True for _ in sub.children()) and has_params(sub)
    ]
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def resolve_layers(
    model: nn.Module, spec: str | Sequence[str] | None, head_names: Sequence[str] = ()
) -> list[str]:
    """DELTA's layer names: ``spec`` (comma-separated or a list) checked against the model, or
    :func:`default_layers` when it is empty."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return default_layers(model)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    all_names = {n for n, _ in model.named_modules() if n}
    for n in names:
        if n not in all_names:
            close = difflib.get_close_matches(n, sorted(all_names), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"DELTA layer {n!r}: no such module in {type(model).__name__}.{hint} "
                f"Available layers: {', '.join(candidate_layers(model, head_names))} "
                f"(any name from model.named_modules() works)"
            )
        if in_head(n, head_names):
            raise ValueError(
                f"DELTA layer {n!r} is (part of) the classifier head {list(head_names)}: "
                f"choose backbone layers"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"DELTA layers list a layer twice: {names}")
    return names


# -------------------------------------------------------------------------------- weight layers
def weight_layers(model: nn.Module) -> list[tuple[str, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear]]:
    """``[(dotted name, module)]`` of the conv / linear layers (:data:`LAYER_TYPES`) that hold a weight
    tensor, in module order (for timm / torchvision CNNs the forward order: stem first, head last)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LAYER_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
