"""How RIFLE re-initialises: in place, from a private seeded generator, optimizer state cleared.

Paper: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349 (REFERENCE.md §3.4-3.8).
``shrink_perturb`` follows Ash & Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020,
arXiv 1910.08475. Semantics, initialisers and why: docs/rifle.md "Semantics" and "Initialisers".
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from .seeding import generator
from .structure import has_params

Initializer = Callable[[nn.Module], None]  # a user's f(module), drawing from torch's global CPU RNG


def _on_global_rng(g: torch.Generator | None, fn: Callable[[], object]) -> None:
    """Run ``fn`` (which draws from torch's global CPU RNG) on ``g``'s stream, continuing it.

    Only the CPU default generator is borrowed - its state is saved and restored around ``fn`` by
    ``fork_rng(devices=[])`` - and no seeding function (``torch.manual_seed``, which also seeds every
    CUDA device) is called.
    """
    if g is None:
        fn()
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.set_state(g.get_state())
        fn()
        g.set_state(torch.random.default_generator.get_state())


def _plain(m: nn.Module, base: object) -> bool:
    """``m``'s ``reset_parameters`` is ``base``'s, and its own parameters are ``weight``/``bias``."""
    return (
        getattr(type(m), "reset_parameters", None) is base
        and isinstance(m._parameters.get("weight"), torch.Tensor)
        and set(m._parameters) <= {"weight", "bias"}
    )


_FAN_IN_UNIFORM = (nn.Linear.reset_parameters, _ConvNd.reset_parameters)
_NO_RANDOMNESS = tuple(
    f
    for f in (
        _NormBase.reset_parameters,
        nn.LayerNorm.reset_parameters,
        nn.GroupNorm.reset_parameters,
        getattr(getattr(nn, "RMSNorm", None), "reset_parameters", None),
    )
    if f is not None
)


@torch.no_grad()
def _fan_in_uniform(m: nn.Module, g: torch.Generator | None) -> None:
    """``nn.Linear`` / ``_ConvNd.reset_parameters`` on ``g``: the same calls in the same order."""
    w, bias = cast(torch.Tensor, m.weight), cast("torch.Tensor | None", m.bias)
    target = w if w.is_contiguous() else torch.empty_like(w, memory_format=torch.contiguous_format)
    nn.init.kaiming_uniform_(target, a=math.sqrt(5), generator=g)
    if target is not w:
        w.copy_(target)
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound, generator=g)


def reset_module(m: nn.Module, g: torch.Generator | None = None) -> None:
    """``m.reset_parameters()`` drawing from ``g``: exactly the values it draws after
    ``torch.manual_seed(s)`` when ``g`` was seeded with ``s``.

    Linear, Conv*, Embedding and the norms are re-implemented on ``g``; any other module's own
    ``reset_parameters()`` runs on ``g``'s stream through :func:`_on_global_rng`.
    """
    kind = getattr(type(m), "reset_parameters", None)
    if kind in _FAN_IN_UNIFORM and _plain(m, kind):
        _fan_in_uniform(m, g)
    elif kind in _NO_RANDOMNESS:
        cast(Callable[[], None], m.reset_parameters)()  # ones / zeros and running statistics: draws nothing
    elif kind is nn.Embedding.reset_parameters and _plain(m, kind):
        emb = cast(nn.Embedding, m)
        nn.init.normal_(emb.weight, generator=g)
        emb._fill_padding_idx_with_zero()
    else:
        _on_global_rng(g, cast(Callable[[], None], m.reset_parameters))


def _reset_default(module: nn.Module, g: torch.Generator | None = None) -> None:
    """Every submodule's own ``reset_parameters()`` - PyTorch's default init, as the first init was."""
    found = False
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)) and has_params(sub, recurse=False):
            reset_module(sub, g)
            found = True
    if not found:
        raise ValueError(f"{type(module).__name__} has no reset_parameters(); choose another init")


def _weights_then_zero_bias_g(fn: Callable[[torch.Tensor, torch.Generator | None], object]) -> Initializer:
    def init(module: nn.Module, g: torch.Generator | None = None) -> None:
        for sub in module.modules():
            w = getattr(sub, "weight", None)
            b = getattr(sub, "bias", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                fn(w, g)
                if isinstance(b, torch.Tensor):
                    nn.init.zeros_(b)
            elif callable(getattr(sub, "reset_parameters", None)) and has_params(sub, recurse=False):
                reset_module(sub, g)  # norms etc.

    init.draws_from_generator = True  # type: ignore[attr-defined]
    return init


def _weights_then_zero_bias(fn: Callable[[torch.Tensor], object]) -> Initializer:
    """An :data:`Initializer` ``f(module)``: ``fn(weight)`` (global RNG) for weights, zero biases."""
    return _weights_then_zero_bias_g(lambda w, g: _on_global_rng(g, lambda: fn(w)))


_reset_default.draws_from_generator = True  # type: ignore[attr-defined]

# Named initialisers: f(module, generator=None). Std of each on a Linear: docs/rifle.md.
INITIALIZERS: dict[str, Callable[..., None]] = {
    "default": _reset_default,
    "lecun_normal": _weights_then_zero_bias_g(
        lambda w, g: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="linear", generator=g)
    ),
    "kaiming_normal": _weights_then_zero_bias_g(
        lambda w, g: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=g)
    ),
    "xavier_uniform": _weights_then_zero_bias_g(lambda w, g: nn.init.xavier_uniform_(w, generator=g)),
    "normal": _weights_then_zero_bias_g(lambda w, g: nn.init.normal_(w, std=0.01, generator=g)),
}


# --------------------------------------------------------------- variants beyond the paper
# Both start from the `default` draw (same generator, same values) and use the module's values
# before the re-init, which the structural CPU copy still holds. Formulas: docs/rifle.md.
SHRINK_PERTURB_DEFAULTS = (0.4, 0.1)  # (shrink lambda, perturb sigma): Ash & Adams' code defaults


def _old_then_fresh(module: nn.Module, g: torch.Generator | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(old value, parameter)`` for each parameter the `default` init redraws (those of submodules
    with a ``reset_parameters()``; others keep their values, as with `default`); on return each of
    them holds the `default` draw."""
    seen: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)) and has_params(sub, recurse=False):
            for p in sub.parameters(recurse=False):
                seen.setdefault(id(p), p)
    old: list[tuple[torch.Tensor, torch.Tensor]] = [(p.detach().clone(), p) for p in seen.values()]
    _reset_default(module, g)
    return old


@torch.no_grad()
def _norm_matched(module: nn.Module, g: torch.Generator | None = None) -> None:
    """The `default` draw, rescaled to the old norms: row by row (dim 0) for tensors of >= 2 dims,
    as a whole for vectors and scalars; an old norm of 0 gives 0. Buffers keep the fresh values."""
    for old, p in _old_then_fresh(module, g):
        new = p.detach().to(torch.float64)
        rows = 1 if new.dim() <= 1 else new.shape[0]
        fresh = new.reshape(rows, -1)
        target = old.to(torch.float64).reshape(rows, -1).norm(dim=1, keepdim=True)
        have = fresh.norm(dim=1, keepdim=True)
        scale = torch.where(have > 0, target / torch.where(have > 0, have, 1.0), 0.0)
        p.copy_((fresh * scale).reshape(p.shape))


def _shrink_perturb_fn(shrink: float, perturb: float) -> Callable[[nn.Module, torch.Generator | None], None]:
    @torch.no_grad()
    def init(module: nn.Module, g: torch.Generator | None = None) -> None:
        """``shrink * old + perturb * (default draw)`` for every parameter; buffers are fresh."""
        for old, p in _old_then_fresh(module, g):
            value = p.detach() * perturb
            if shrink != 0:  # skipped at 0: 0 * old would turn a non-finite old value into NaN
                value = value + shrink * old
            p.copy_(value)

    init.draws_from_generator = True  # type: ignore[attr-defined]
    return init


_norm_matched.draws_from_generator = True  # type: ignore[attr-defined]
INITIALIZERS["norm_matched"] = _norm_matched
INITIALIZERS["shrink_perturb"] = _shrink_perturb_fn(*SHRINK_PERTURB_DEFAULTS)


def _parse_shrink_perturb(init: str, args: str) -> tuple[float, float]:
    usage = (
        f"init {init!r}: expected shrink_perturb:LAMBDA,SIGMA with 0 <= LAMBDA <= 1 and SIGMA >= 0, "
        f"not both 0 (e.g. shrink_perturb:0.4,0.1; plain shrink_perturb means "
        f"{SHRINK_PERTURB_DEFAULTS[0]},{SHRINK_PERTURB_DEFAULTS[1]})"
    )
    parts = args.split(",")
    if len(parts) != 2:
        raise ValueError(usage)
    try:
        shrink, perturb = (float(x) for x in parts)
    except ValueError:
        raise ValueError(usage) from None
    if not (
        math.isfinite(shrink)
        and math.isfinite(perturb)
        and 0 <= shrink <= 1
        and perturb >= 0
        and (shrink, perturb) != (0, 0)
    ):
        raise ValueError(usage)
    return shrink, perturb


def canonical_init(init: str | Initializer) -> str | Initializer:
    """One spelling per initialiser: ``-`` -> ``_`` in the name; ``shrink_perturb`` with its
    parameters written out (``"shrink-perturb"`` -> ``"shrink_perturb:0.4,0.1"``). Raises
    ``ValueError`` for an unknown name or bad parameters; a callable is returned unchanged."""
    if callable(init):
        return init
    if not isinstance(init, str):
        raise ValueError(f"init={init!r}: expected a name ({', '.join(INITIALIZERS)}) or a callable(module)")
    name, sep, args = init.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name == "shrink_perturb":
        shrink, perturb = _parse_shrink_perturb(init, args) if sep else SHRINK_PERTURB_DEFAULTS
        return f"shrink_perturb:{shrink!r},{perturb!r}"
    if sep or name not in INITIALIZERS:
        raise ValueError(
            f"unknown init {init!r}; choose one of {', '.join(INITIALIZERS)} "
            f"(shrink_perturb:LAMBDA,SIGMA sets its parameters) or pass a callable(module)"
        )
    return name


def get_initializer(init: str | Initializer) -> Callable[[nn.Module, torch.Generator | None], None]:
    """``f(module, generator)`` for a name of :data:`INITIALIZERS` (``-`` or ``_``;
    ``shrink_perturb:LAMBDA,SIGMA``) or a user's ``f(module)``."""
    if callable(init):
        if getattr(init, "draws_from_generator", False):
            return init  # type: ignore[return-value]
        return lambda module, g: _on_global_rng(g, lambda: init(module))
    name = canonical_init(init)
    if isinstance(name, str) and name.startswith("shrink_perturb:"):
        return _shrink_perturb_fn(*(float(x) for x in name.partition(":")[2].split(",")))
    return INITIALIZERS[name]  # type: ignore[index]


def _cpu_copy(module: nn.Module, memo: dict[int, object] | None = None) -> nn.Module:
    """A structural copy of ``module`` on the CPU: new module objects, fresh CPU copies of parameters
    (float32), buffers and plain tensor attributes, no hooks. Other attributes are shared, never
    deep-copied (a hook bound to a trainer must not copy the trainer)."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[return-value]

    def tensor(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in memo:  # tied tensors stay tied
            v = t.detach().to("cpu")
            if param and v.is_floating_point():
                v = v.to(torch.float32)
            v = v.clone()
            memo[id(t)] = nn.Parameter(v, requires_grad=t.requires_grad) if param else v
        return memo[id(t)]  # type: ignore[return-value]

    c = type(module).__new__(type(module))
    memo[id(module)] = c
    state = dict(vars(module))
    for key, value in state.items():
        if "hooks" in key and isinstance(value, dict):
            state[key] = OrderedDict()
        elif isinstance(value, torch.Tensor):
            state[key] = tensor(value, isinstance(value, nn.Parameter))
    state["_parameters"] = {k: None if p is None else tensor(p, True) for k, p in module._parameters.items()}
    state["_buffers"] = {k: None if b is None else tensor(b, False) for k, b in module._buffers.items()}
    state["_modules"] = {k: None if m is None else _cpu_copy(m, memo) for k, m in module._modules.items()}
    object.__setattr__(c, "__dict__", state)
    return c


def draw_state(
    modules: Sequence[nn.Module], seed: int, index: int, init: str | Initializer = "default"
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """New ``(parameters, buffers)`` of each module (CPU tensors, in ``parameters()`` / ``buffers()``
    order), a pure function of ``(seed, index, init)`` and the modules' structure."""
    fn = get_initializer(init)
    g = generator(seed, "reinit", index)
    out = []
    for module in modules:
        cpu = _cpu_copy(module)
        fn(cpu, g)
        out.append(([p.detach().clone() for p in cpu.parameters()], [b.clone() for b in cpu.buffers()]))
    return out


def draw_values(
    modules: Sequence[nn.Module], seed: int, index: int, init: str | Initializer = "default"
) -> list[list[torch.Tensor]]:
    """New parameter values for ``modules`` (CPU tensors), a pure function of ``(seed, index, init)``."""
    return [params for params, _ in draw_state(modules, seed, index, init)]


@torch.no_grad()
def reinit_(modules: Sequence[nn.Module], seed: int, index: int, init: str | Initializer = "default") -> None:
    """Re-initialise ``modules`` in place (parameters and buffers) with :func:`draw_state`'s values."""
    for module, (params, buffers) in zip(modules, draw_state(modules, seed, index, init)):
        for p, v in zip(module.parameters(), params):
            p.copy_(v.to(device=p.device, dtype=p.dtype))
        for b, v in zip(module.buffers(), buffers):
            b.copy_(v.to(device=b.device, dtype=b.dtype))


def clear_optimizer_state(optimizer: torch.optim.Optimizer | None, params: Iterable[nn.Parameter]) -> int:
    """Drop the optimizer's per-parameter state (momentum, Adam moments); returns how many were held.

    A param group holding only these parameters also loses its own step count (timm's Lamb and Adan
    count steps per group, for the bias correction), so they restart as under a fresh optimizer."""
    if optimizer is None:
        return 0
    params = list(params)
    n = 0
    for p in params:
        if optimizer.state.pop(p, None) is not None:
            n += 1
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if "step" in group and group["params"] and all(id(p) in ids for p in group["params"]):
            del group["step"]
    return n


def cosine_factor(pos: float, length: float) -> float:
    """``0.5 * (1 + cos(pi * pos / length))``: 1 at the period's start, -> 0 at its end."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(pos / max(length, 1e-12), 0.0), 1.0)))
