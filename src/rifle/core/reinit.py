"""How RIFLE re-initialises: in place, seeded, and with the optimizer's stale state cleared.

Parameters are overwritten with ``copy_`` under ``no_grad`` - the module object and its
``nn.Parameter`` objects stay the same, so the optimizer and DDP keep valid references
(REFERENCE.md §3.4, §5). New values are drawn on the CPU from a generator seeded by
(run seed, re-init index), then copied to the parameters' device: every DDP rank and a resumed run
draw the identical head (§3.8).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .seeding import derive_seed

Initializer = Callable[[nn.Module], None]


def _reset_default(module: nn.Module) -> None:
    """The module's own ``reset_parameters()`` - PyTorch's default init, as the first init was."""
    found = False
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset) and any(True for _ in sub.parameters(recurse=False)):
            reset()
            found = True
    if not found:
        raise ValueError(f"{type(module).__name__} has no reset_parameters(); choose another init")


def _weights_then_zero_bias(fn: Callable[[torch.Tensor], object]) -> Initializer:
    def init(module: nn.Module) -> None:
        for sub in module.modules():
            w = getattr(sub, "weight", None)
            b = getattr(sub, "bias", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                fn(w)
                if isinstance(b, torch.Tensor):
                    nn.init.zeros_(b)
            elif callable(getattr(sub, "reset_parameters", None)) and any(
                    True for _ in sub.parameters(recurse=False)):
                sub.reset_parameters()  # norms etc.
    return init


INITIALIZERS: dict[str, Initializer] = {
    "default": _reset_default,
    "kaiming_normal": _weights_then_zero_bias(lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear")),
    "xavier_uniform": _weights_then_zero_bias(nn.init.xavier_uniform_),
    "normal": _weights_then_zero_bias(lambda w: nn.init.normal_(w, std=0.01)),
}


def get_initializer(init: str | Initializer) -> Initializer:
    if callable(init):
        return init
    try:
        return INITIALIZERS[init]
    except KeyError:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITIALIZERS)} or pass a "
                         f"callable(module)") from None


def draw_values(modules: Sequence[nn.Module], seed: int, index: int,
                init: str | Initializer = "default") -> list[list[torch.Tensor]]:
    """New parameter values for ``modules`` (CPU tensors), a pure function of ``(seed, index, init)``."""
    fn = get_initializer(init)
    out: list[list[torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "reinit", index))
        for k, module in enumerate(modules):
            cpu = copy.deepcopy(module).to("cpu", dtype=torch.float32)
            fn(cpu)
            out.append([p.detach().clone() for p in cpu.parameters()])
    return out


@torch.no_grad()
def reinit_(modules: Sequence[nn.Module], seed: int, index: int,
            init: str | Initializer = "default") -> None:
    """Re-initialise ``modules`` in place with the values of :func:`draw_values`."""
    for module, values in zip(modules, draw_values(modules, seed, index, init)):
        params = list(module.parameters())
        for p, v in zip(params, values):
            p.copy_(v.to(device=p.device, dtype=p.dtype))


def clear_optimizer_state(optimizer: torch.optim.Optimizer | None, params: Iterable[nn.Parameter]) -> int:
    """Drop the optimizer's per-parameter state (momentum, Adam moments); returns how many were held."""
    if optimizer is None:
        return 0
    n = 0
    for p in params:
        if optimizer.state.pop(p, None) is not None:
            n += 1
    return n


def cosine_factor(pos: float, length: float) -> float:
    """``0.5 * (1 + cos(pi * pos / length))``: 1 at the period's start, -> 0 at its end."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(pos / max(length, 1e-12), 0.0), 1.0)))
