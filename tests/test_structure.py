"""rifle.core.structure on real models: DELTA's default feature layers, and has_params."""

import pytest
import timm
import torchvision
from torch import nn

from rifle.core.structure import default_layers, has_params
from rifle.models import create_model


@pytest.mark.parametrize(
    "name,layers",
    [
        ("efficientnet_lite0", ["blocks.3.2", "blocks.4.2", "blocks.5.3", "blocks.6.0"]),  # docs/methods.md
        ("tiny_cnn", ["blocks.0", "blocks.1", "blocks.2"]),
    ],
)
def test_default_layers_of_the_builtin_models(name, layers):
    model = create_model(name, 3, pretrained=False)
    assert default_layers(model) == layers
    for n in layers:
        model.get_submodule(n)


def test_default_layers_of_resnets_and_stage_models():
    resnet = ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert default_layers(timm.create_model("resnet18", pretrained=False, num_classes=3)) == resnet
    assert default_layers(torchvision.models.resnet18(weights=None)) == resnet
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    assert default_layers(convnext) == ["stages.0", "stages.1", "stages.2", "stages.3"]


def test_default_layers_unknown_model_lists_candidates():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no default layers for Sequential.*--delta-layers.*Candidates: 0"):
        default_layers(model)


def test_has_params_recurse():
    block = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert has_params(block) and not has_params(block, recurse=False)
    assert has_params(block[0], recurse=False) and not has_params(nn.ReLU())
