"""The CIFAR backbones (ResNet-18, ResNet-20, DenseNet-BC-100) built by name, behind the backbone contract."""

from __future__ import annotations

import pytest
import torch

from lightning_ood.errors import ConfigError
from lightning_ood.models import build_backbone


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "feature_dim", "params"),
    [
        ("resnet18", 512, 11_173_962),  # the standard CIFAR ResNet-18 (kuangliu / ReAct / DICE): 11.17M
        ("resnet20", 64, 272_474),  # He et al. report 0.27M for ResNet-20
        ("densenet100", 342, 769_162),  # DenseNet-BC (L=100, k=12): 0.8M in Huang et al., 0.77M with a 10-way head
    ],
)
def test_architecture_sizes(name, feature_dim, params):
    model = build_backbone(name, num_classes=10)
    assert model.feature_dim == feature_dim
    assert n_params(model) == params


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "densenet100"])
def test_feature_head_contract(name):
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = model.features(x)
        logits = model(x)
    assert h.shape == (3, model.feature_dim)
    assert (h >= 0).all(), "features are taken after the final ReLU"
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    torch.testing.assert_close(logits, h @ model.head.weight.T + model.head.bias)


def test_blocks_are_listed_in_forward_order():
    assert list(build_backbone("resnet18", 10).blocks()) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert list(build_backbone("densenet100", 10).blocks()) == ["dense1", "dense2", "dense3"]


def test_densenet_alias_and_unknown_name():
    assert build_backbone("densenet", 10).feature_dim == 342
    with pytest.raises(ConfigError, match=r"Unknown backbone 'resnet99'. Choose one of: .*resnet18"):
        build_backbone("resnet99", 10)
