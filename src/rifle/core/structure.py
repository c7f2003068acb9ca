"""Find the classifier head of a model (timm, torchvision, Hugging Face, ``nn.Sequential``).

Resolution order for :func:`find_head`:

1. an explicit module, a dotted name (``"fc"``, ``"classifier.1"``) or a list of either;
2. timm's ``get_classifier()`` (a module, or a tuple for distilled models);
3. well-known attribute names: torchvision ResNet ``fc``; VGG / MobileNet / EfficientNet / ConvNeXt
   ``classifier`` (its last ``Linear``); ViT ``heads.head``; Hugging Face ``classifier`` / ``score``;
4. an ``nn.Sequential`` model: its last ``Linear``.

A model whose head cannot be found gets an error listing its Linear layers and how to name one.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

HeadSpec = nn.Module | str | Sequence[nn.Module | str]

_KNOWN_NAMES = ("fc", "heads.head", "head.fc", "head", "classifier", "heads", "score", "last_linear")


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


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
                f"Linear layers: {', '.join(linear_names(model)) or 'none'}"
            ) from None
    if isinstance(spec, nn.Module):
        _module_name(model, spec)  # raises when foreign
        return spec
    raise TypeError(f"head must be a module, a dotted name or a list of them, got {type(spec).__name__}")


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n]


def _auto(model: nn.Module) -> list[nn.Module]:
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            clf = get_classifier()
        except Exception:  # noqa: BLE001 - a model's own accessor may not apply
            clf = None
        mods = list(clf) if isinstance(clf, (tuple, list)) else [clf]
        mods = [m for m in mods if isinstance(m, nn.Module) and _has_params(m)]
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
        f"model: {', '.join(linear_names(model)[-8:]) or 'none'}"
    )


def find_head(model: nn.Module, head: HeadSpec | None = None) -> list[nn.Module]:
    """Return the head module(s) to re-initialise; raises ``ValueError`` with guidance when unclear."""
    if head is None:
        mods = _auto(model)
    elif isinstance(head, (str, nn.Module)):
        mods = [_resolve_one(model, head)]
    else:
        mods = [_resolve_one(model, h) for h in head]
        if not mods:
            raise ValueError("head=[] names no module to re-initialise")
    for m in mods:
        if not _has_params(m):
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


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks in depth order: timm ``blocks`` (stages flattened), ResNet ``layer1..4``."""
    out: list[tuple[str, nn.Module]] = []
    if isinstance(getattr(model, "blocks", None), nn.Sequential):
        for name, stage in model.blocks.named_children():
            if isinstance(stage, nn.Sequential):
                out += [(f"blocks.{name}.{n}", b) for n, b in stage.named_children()]
            else:
                out.append((f"blocks.{name}", stage))
        return out
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        seq = getattr(model, layer, None)
        if isinstance(seq, nn.Sequential):
            out += [(f"{layer}.{n}", b) for n, b in seq.named_children()]
    if not out and isinstance(getattr(model, "stages", None), nn.Sequential):  # timm ConvNeXt & co.
        for name, stage in model.stages.named_children():
            blocks = getattr(stage, "blocks", None)
            if isinstance(blocks, nn.Sequential):
                out += [(f"stages.{name}.blocks.{n}", b) for n, b in blocks.named_children()]
    return out


def select_modules(model: nn.Module, spec: str) -> list[nn.Module]:
    """Modules to re-initialise besides the head (``--reinit-modules``).

    * ``"last:N"`` - the last N blocks of the backbone (timm ``blocks`` / ``stages``, ResNet
      ``layer1..layer4``), e.g. ``last:1`` = the block just below the pooling;
    * anything else is a regular expression matched (``re.fullmatch``) against dotted module names,
      e.g. ``"layer4\\.2\\..*"`` or ``"blocks\\.6.*"``; nested matches are collapsed to the outermost.
    """
    import re
    spec = spec.strip()
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            raise ValueError(f"--reinit-modules {spec!r}: expected last:N with an integer N") from None
        blocks = _blocks(model)
        if not blocks:
            raise ValueError(f"--reinit-modules {spec!r}: no block structure known for "
                             f"{type(model).__name__}; give a regular expression over module names")
        if not 1 <= n <= len(blocks):
            raise ValueError(f"--reinit-modules {spec!r}: N must be in 1..{len(blocks)} (blocks: "
                             f"{', '.join(name for name, _ in blocks[-4:])} ...)")
        return [m for _, m in blocks[-n:]]
    try:
        pattern = re.compile(spec)
    except re.error as e:
        raise ValueError(f"--reinit-modules {spec!r}: not a valid regular expression ({e})") from None
    chosen: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if name and pattern.fullmatch(name) and _has_params(m):
            if not any(name.startswith(c + ".") for c, _ in chosen):
                chosen.append((name, m))
    if not chosen:
        names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        raise ValueError(f"--reinit-modules {spec!r} matches no module with parameters; module names "
                         f"look like: {', '.join(names[-6:])}")
    return [m for _, m in chosen]
