"""Backbones by name: ``build_backbone("resnet18", num_classes=10)``, ``build_backbone("resnet50", 1000,
weights="DEFAULT")``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from lightning_ood.errors import ConfigError, unknown_name
from lightning_ood.models.base import Backbone
from lightning_ood.models.cifar_resnet import CifarResNet, resnet18, resnet20
from lightning_ood.models.densenet import DenseNetBC, densenet100
from lightning_ood.models.imagenet import TorchvisionBackbone, mobilenet_v2, resnet50, vit_b_16

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "densenet100": densenet100,
    # torchvision ImageNet classifiers (pretrained weights through ``weights``)
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "vit_b_16": vit_b_16,
}
ALIASES = {"densenet": "densenet100", "densenet_bc_100": "densenet100"}


def build_backbone(name: str, num_classes: int, **kwargs) -> Backbone:
    """Instantiate a registered backbone; raises a :class:`ConfigError` listing the choices for an unknown name."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKBONES:
        raise unknown_name("backbone", name, [*BACKBONES, *ALIASES])
    accepted = set(inspect.signature(BACKBONES[key]).parameters)
    unknown = set(kwargs) - accepted
    if unknown:
        raise ConfigError(
            f"Backbone {name!r} does not take {', '.join(sorted(unknown))} (pretrained weights are for the torchvision "
            f"ImageNet backbones; CIFAR backbones are trained here)."
        )
    return BACKBONES[key](num_classes=num_classes, **kwargs)


__all__ = [
    "BACKBONES",
    "Backbone",
    "CifarResNet",
    "DenseNetBC",
    "TorchvisionBackbone",
    "build_backbone",
    "densenet100",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "resnet50",
    "vit_b_16",
]
