"""Backbones by name: ``build_backbone("resnet18", num_classes=10)``, ``build_backbone("resnet50", 1000,
weights="DEFAULT")``, ``build_backbone("densenet100", 10, weights="checkpoint_100.pth.tar")`` (published weights in
their authors' format, see :mod:`lightning_ood.models.formats`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from lightning_ood.errors import ConfigError, unknown_name
from lightning_ood.models.base import Backbone
from lightning_ood.models.cifar_resnet import CifarResNet, resnet18, resnet20
from lightning_ood.models.densenet import DenseNetBC, densenet100
from lightning_ood.models.formats import FORMATS, LoadedWeights, load_weights
from lightning_ood.models.imagenet import TorchvisionBackbone, mobilenet_v2, resnet50, vit_b_16
from lightning_ood.models.timm_vit import TimmViTB16, vit_base_patch16_224
from lightning_ood.normalization import Normalization

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "densenet100": densenet100,
    # torchvision ImageNet classifiers (pretrained weights through ``weights``)
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "vit_b_16": vit_b_16,
    # timm: the paper's ViT-B/16 (ImageNet-21k pre-trained, ImageNet-1k fine-tuned)
    "vit_base_patch16_224": vit_base_patch16_224,
}
ALIASES = {"densenet": "densenet100", "densenet_bc_100": "densenet100"}


def canonical_name(name: str) -> str:
    """The registered name of a backbone or alias; raises a :class:`ConfigError` listing the choices."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKBONES:
        raise unknown_name("backbone", name, [*BACKBONES, *ALIASES])
    return key


def build_backbone(name: str, num_classes: int, **kwargs) -> Backbone:
    """Instantiate a registered backbone; raises a :class:`ConfigError` listing the choices for an unknown name."""
    key = canonical_name(name)
    accepted = set(inspect.signature(BACKBONES[key]).parameters)
    if "weights" in kwargs and "weights" not in accepted:  # published CIFAR weights in their authors' format
        weights, weights_format = kwargs.pop("weights"), kwargs.pop("weights_format", None)
        return pretrained_backbone(key, num_classes, weights, weights_format).backbone
    unknown = set(kwargs) - accepted
    if unknown:
        raise ConfigError(f"Backbone {name!r} does not take {', '.join(sorted(unknown))}.")
    return BACKBONES[key](num_classes=num_classes, **kwargs)


@dataclass
class Pretrained:
    """A backbone with its weights loaded, what they came with, and the normalisation they were trained with."""

    backbone: Backbone
    loaded: LoadedWeights | None = None
    normalization: Normalization | None = None


def pretrained_backbone(
    name: str, num_classes: int, weights: str | None = None, weights_format: str | None = None
) -> Pretrained:
    """Build backbone ``name`` and load ``weights``: for torchvision and timm backbones a weights name or a local
    file (their own handling); for the CIFAR backbones a file in any format of :mod:`lightning_ood.models.formats`.
    ``weights_format`` names the format when a file is ambiguous (CIFAR backbones only); ``"random"`` asks for an
    untrained network on purpose (``test`` refuses one otherwise)."""
    key = canonical_name(name)
    build = BACKBONES[key]
    if weights == "random":  # asked for explicitly: an untrained network
        weights = None
    if "weights" in inspect.signature(build).parameters:
        if weights_format is not None:
            raise ConfigError(
                f"model.weights_format is for the CIFAR backbones' published formats ({', '.join(FORMATS)}); "
                f"{key!r} reads its own weights names and files: leave it unset."
            )
        backbone = build(num_classes=num_classes, weights=weights)
        return Pretrained(backbone, None, getattr(backbone, "weights_normalization", None))
    backbone = build(num_classes=num_classes)
    if weights is None:
        return Pretrained(backbone)
    loaded = load_weights(weights, backbone, key, weights_format)
    backbone.load_state_dict(loaded.state)
    return Pretrained(backbone, loaded, loaded.normalization)


__all__ = [
    "BACKBONES",
    "Backbone",
    "CifarResNet",
    "DenseNetBC",
    "Pretrained",
    "TimmViTB16",
    "TorchvisionBackbone",
    "build_backbone",
    "canonical_name",
    "densenet100",
    "mobilenet_v2",
    "pretrained_backbone",
    "resnet18",
    "resnet20",
    "resnet50",
    "vit_b_16",
    "vit_base_patch16_224",
]
