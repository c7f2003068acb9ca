"""Feature taps for DELTA: record named layers' outputs, and a frozen copy of the pretrained model.

Support code of :mod:`rifle.methods.delta` (Li et al., "DELTA: DEep Learning Transfer using Feature Map
with Attention for Convolutional Networks", ICLR 2019, arXiv 1901.09229): :class:`FeatureTap` holds the
forward hooks on the chosen layers of the fine-tuned and the frozen model; :func:`frozen_copy` makes the
frozen pretrained model (why it is built this way: docs/methods.md "delta", "Frozen model").
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.rifle import unwrap_model


class StopForward(Exception):
    """Raised by a hook to skip the rest of the frozen model's forward."""


class FeatureTap:
    """Forward hooks that record the outputs of named layers of ``model``.

    ``grad_only``: record only when autograd is on (training forwards, not evaluation);
    ``stop``: raise :class:`StopForward` once every layer has produced its output;
    ``transform(name, out) -> out``: optionally replace the output (attention computation).
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str], *, grad_only: bool = False, stop: bool = False
    ) -> None:
        self.layers = list(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}
        self.grad_only, self.stop = grad_only, stop
        self.transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            if self.grad_only and not torch.is_grad_enabled():
                return None
            if self.transform is not None:
                out = self.transform(name, out)
            self.outputs[name] = out
            self.versions[name] = out._version if isinstance(out, torch.Tensor) else 0
            if self.stop and len(self.outputs) == len(self.layers):
                raise StopForward
            return out if self.transform is not None else None

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The recorded outputs (then forgotten); errors for missing or in-place-modified ones."""
        out, self.outputs = self.outputs, {}
        missing = [n for n in self.layers if n not in out]
        if missing:
            raise RuntimeError(f"DELTA: no output recorded for layer(s) {missing} in this forward")
        changed = [n for n in self.layers if out[n]._version != self.versions[n]]
        if changed:
            raise RuntimeError(
                f"DELTA: the output of {changed} was modified in place after the layer ran; "
                f"choose another layer (e.g. the enclosing block)"
            )
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _is_hook_dict(name: str, value: Any) -> bool:
    return "hook" in name and isinstance(value, dict)


def frozen_copy(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None, batch_stats: bool = False
) -> nn.Module:
    """A deep copy of ``model`` without its hooks, with ``state`` loaded, no grads, locked in eval.

    ``batch_stats``: its BatchNorm layers normalise with the current batch's statistics (their running
    statistics are dropped, so nothing is ever updated) instead of the pretrained running statistics.
    """
    model = unwrap_model(model)
    memo: dict[int, Any] = {}
    for m in model.modules():  # hooks hold references to trainers / methods: never copy them
        for k, v in vars(m).items():
            if _is_hook_dict(k, v):
                memo[id(v)] = type(v)()
    frozen = copy.deepcopy(model, memo)
    if state is not None:
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        frozen.load_state_dict(state, strict=True)
    for p in frozen.parameters():
        p.requires_grad_(False)
        p.grad = None
    if batch_stats:
        for m in frozen.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
    nn.Module.train(frozen, False)
    keep_eval = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), frozen)
    frozen.train = keep_eval  # type: ignore[method-assign]  # deliberately: train() keeps it in eval
    return frozen
