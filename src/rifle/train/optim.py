"""The run's optimizer: the paper's SGD by default, any of timm's optimizers by name, layer-wise LR decay.

``sgd`` is ``torch.optim.SGD`` with classical momentum, as the official RIFLE script (REFERENCE.md §2);
other names go to timm's ``create_optimizer_v2`` with the trainer's parameter groups. Layer decay follows
BEiT (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022, arXiv 2106.08254) and
timm's ``param_groups_layer_decay``. Choices and how they differ from timm's ``train.py``: docs/guide.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DEFAULT_OPT = "sgd"
# what the trainer cannot drive, and why (checked by the config; see docs/guide.md "Optimizers")
UNSUPPORTED = {
    "adahessian": "it needs a second-order backward (loss.backward(create_graph=True)), which the trainer "
    "does not do",
    "lookahead": "timm's Lookahead keeps the per-parameter state in an inner optimizer, where RIFLE's "
    "optimizer-state reset and gradient diagnosis do not reach",
}


def optimizer_names() -> list[str]:
    """Every name ``--opt`` accepts (``sgd`` first); a ``lookahead_`` prefix is refused."""
    import timm.optim

    return [DEFAULT_OPT] + [
        n
        for n in timm.optim.list_optimizers()
        if isinstance(n, str) and n != DEFAULT_OPT and n not in UNSUPPORTED
    ]


# timm optimizers built on CUDA-only kernels: the package they come from
NEEDS_CUDA = {"bnb": "bitsandbytes", "fused": "apex"}


def check_optimizer(
    opt: str, eps: float | None = None, betas: tuple[float, ...] | None = None, *, device: str | None = None
) -> str | None:
    """``None`` when ``opt`` with these options can be built; otherwise what is wrong (for an error).

    ``device`` (a ``--device`` value): ``bnb*`` / ``fused*`` are refused when the run would be on the CPU
    (``cpu``, or ``auto`` without CUDA), before any work; ``None`` skips that check."""
    name = opt.lower()
    if name.startswith("lookahead_") or name in UNSUPPORTED:
        key = "lookahead" if name.startswith("lookahead_") else name
        return f"not supported: {UNSUPPORTED[key]}"
    prefix = next((p for p in NEEDS_CUDA if name.startswith(p)), None)
    if (
        prefix
        and device is not None
        and (device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    ):
        where = "--device cpu" if device == "cpu" else "this machine has no CUDA GPU"
        alt = name[len(prefix) :].removesuffix("8bit")
        alt = alt if alt != DEFAULT_OPT and alt in optimizer_names() else "adamw"
        return f"needs CUDA ({NEEDS_CUDA[prefix]}'s GPU kernels) but {where}: use e.g. --opt {alt} or sgd"
    if name == DEFAULT_OPT:
        has_eps = has_betas = False
    else:
        import timm.optim

        try:
            info = timm.optim.get_optimizer_info(name)
        except ValueError:
            import difflib

            close = difflib.get_close_matches(name, optimizer_names(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return (
                f"unknown optimizer{hint}; choose sgd (the paper's, default) or one of timm's: "
                f"python -c 'import timm.optim; print(timm.optim.list_optimizers())'"
            )
        has_eps, has_betas = info.has_eps, info.has_betas
    if eps is not None and not has_eps:
        return "has no eps: --opt-eps applies to adaptive optimizers (adam, adamw, lamb, ...)"
    if betas is not None and not has_betas:
        return "has no betas: --opt-betas applies to Adam-type optimizers (adam, adamw, lamb, lion, ...)"
    return None


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: layer index}, number of layers)`` from timm's ``group_matcher`` (head last)."""
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise ValueError(
            f"--layer-decay needs a model that tells its layer order through timm's "
            f"group_matcher(); {type(model).__name__} has none. Use a timm model (e.g. timm's "
            f"resnet50.tv_in1k holds torchvision's ResNet-50 weights) or leave --layer-decay "
            f"unset"
        )
    from timm.models import group_parameters

    ids = group_parameters(model, matcher(coarse=False), reverse=True)
    n = max(ids.values()) + 1 if ids else 1
    return {name: ids.get(name, n - 1) for name, _ in model.named_parameters()}, n


def split_by_layer(
    groups: list[dict], model: nn.Module, decay: float, lr: float, log: Callable[[str], None] = print
) -> list[dict]:
    """Each group split by layer: ``name`` ``<group>.layer<i>``, ``lr = (group lr or lr) * decay**(L-1-i)``,
    ``layer_lr_scale`` (not timm's ``lr_scale``, which timm's schedulers would apply a second time) and
    ``layer`` recorded; every other key of the group (weight_decay, ...) is kept."""
    ids, n = layer_ids(model)
    by_param = {id(p): ids[name] for name, p in model.named_parameters()}
    out = []
    for gi, g in enumerate(groups):
        base = g.get("name", str(gi))
        layers: dict[int, list[torch.Tensor]] = {}
        for p in g["params"]:
            layers.setdefault(by_param[id(p)], []).append(p)
        for i in sorted(layers):
            scale = decay ** (n - 1 - i)
            out.append(
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": layers[i],
                    "name": f"{base}.layer{i}",
                    "group": base,
                    "layer": i,
                    "layer_lr_scale": scale,
                    "lr": float(g.get("lr", lr)) * scale,
                }
            )
    if n == 1:
        log(f"layer decay {decay}: {type(model).__name__} has one layer group only: no effect")
    else:
        log(
            f"layer decay {decay}: {n} layers (timm group_matcher), LR scale {decay ** (n - 1):.3g} for "
            f"the first, 1 for the last (the head); {len(out)} parameter groups"
        )
    return out


def build_optimizer(
    groups: list[dict],
    *,
    opt: str = DEFAULT_OPT,
    lr: float,
    momentum: float,
    weight_decay: float,
    eps: float | None = None,
    betas: tuple[float, ...] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (their own ``lr`` / ``weight_decay`` win over the defaults given)."""
    problem = check_optimizer(opt, eps, betas)
    if problem:
        raise ValueError(f"--opt {opt}: {problem}")
    if opt.lower() == DEFAULT_OPT:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    import timm.optim

    kw: dict[str, Any] = {}
    if eps is not None:
        kw["eps"] = float(eps)
    if betas is not None:
        kw["betas"] = tuple(float(b) for b in betas)
    try:
        # momentum reaches only optimizers that have one (timm's has_momentum)
        return timm.optim.create_optimizer_v2(
            groups, opt=opt.lower(), lr=lr, weight_decay=weight_decay, momentum=momentum, **kw
        )
    except (AssertionError, ImportError, TypeError, ValueError) as e:  # e.g. bitsandbytes / apex without CUDA
        raise ValueError(f"--opt {opt}: timm could not build it: {e}") from e
