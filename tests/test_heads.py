"""Head discovery for timm, torchvision, HF-like and Sequential models; clear errors otherwise."""

import pytest
import timm
import torchvision
from torch import nn

from rifle import find_head


@pytest.mark.parametrize(
    "name,path",
    [
        ("resnet18", "fc"),
        ("vgg11", "classifier.6"),
        ("mobilenet_v3_small", "classifier.3"),
        ("efficientnet_b0", "classifier.1"),
        ("convnext_tiny", "classifier.2"),
        ("vit_b_16", "heads.head"),
    ],
)
def test_torchvision_heads(name, path):
    model = torchvision.models.get_model(name, weights=None, num_classes=5)
    assert find_head(model) == [model.get_submodule(path)]


@pytest.mark.parametrize(
    "name", ["resnet18", "tf_efficientnet_lite0", "convnext_atto", "vit_tiny_patch16_224"]
)
def test_timm_heads(name):
    model = timm.create_model(name, pretrained=False, num_classes=4)
    head = find_head(model)
    assert head == [model.get_classifier()]
    assert head[0].out_features == 4


def test_hf_like_classifier_attribute():
    class Cls(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.classifier = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    m = Cls()
    assert find_head(m) == [m.classifier[2]]


def test_unfindable_head_says_how_to_name_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 3)
            self.out_layer = nn.Linear(3, 2)

    with pytest.raises(ValueError, match=r"head='my_head'.*out_layer"):
        find_head(Odd())
    with pytest.raises(ValueError, match="no such submodule"):
        find_head(Odd(), "nope")


def test_head_without_parameters_is_an_error():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(ValueError):
        find_head(model)
    m = nn.Sequential(nn.Linear(2, 2), nn.Identity())
    with pytest.raises(ValueError, match="no parameters"):
        find_head(m, "1")
