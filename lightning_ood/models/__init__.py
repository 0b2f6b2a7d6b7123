"""Backbones by name: ``build_backbone("resnet18", num_classes=10)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from lightning_ood.errors import ConfigError, unknown_name
from lightning_ood.models.base import Backbone
from lightning_ood.models.cifar_resnet import CifarResNet, resnet18, resnet20
from lightning_ood.models.densenet import DenseNetBC, densenet100

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "densenet100": densenet100,
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
    "build_backbone",
    "densenet100",
    "resnet18",
    "resnet20",
]
