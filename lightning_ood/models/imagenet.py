"""torchvision's ImageNet classifiers behind the backbone contract, with their pretrained weights.

- ``resnet50``: 2048-d features, the pooled output of ``layer4`` (which ends in a ReLU); head = torchvision's ``fc``.
- ``mobilenet_v2``: 1280-d features, the pooled output of ``features`` (which ends in a ReLU6); head = the Linear of
  torchvision's ``classifier`` (its Dropout only acts in training).
- ``vit_b_16``: 768-d features, the class token after the encoder's final LayerNorm (what torchvision feeds its
  head); head = ``heads.head``.

Each wraps torchvision's own model as ``self.net`` with the head moved out to ``self.head`` (``net.<head> =
Identity``, so ``net(x)`` returns the features): the architectures are torchvision's, and state-dict keys are
torchvision's behind a ``net.`` prefix. ``weights`` is a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``,
...; from torch.hub's cache, downloaded when missing) or the path of a local ``.pth``/``.pt`` state dict, with
torchvision's keys or this backbone's own.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import get_model_weights

from lightning_ood.checkpoints import load_state_dict
from lightning_ood.errors import CheckpointError, ConfigError
from lightning_ood.models.base import Backbone, BatchNormTail
from lightning_ood.models.formats import load_checked

StateDict = dict[str, Tensor]


# ------------------------------------------------------------------------------------------------ weights
def is_weights_name(weights: str) -> bool:
    """Whether ``weights`` names a torchvision weights enum member rather than a file."""
    return re.fullmatch(r"\w+", weights) is not None and not Path(weights).exists()


def weights_member(arch: str, name: str, num_classes: int):
    """The torchvision weights enum member ``name`` of ``arch`` (``DEFAULT`` included), checked against the class
    count before anything is downloaded."""
    enum = get_model_weights(arch)
    members = enum.__members__  # includes the DEFAULT alias, unlike list(enum)
    if name.upper() not in members:
        raise ConfigError(
            f"Unknown weights {name!r} for {arch}. Choose one of: {', '.join(members)}; or give the path of a local "
            f".pth/.pt state dict."
        )
    member = members[name.upper()]
    categories = len(member.meta["categories"])
    if num_classes != categories:
        raise ConfigError(
            f"Pretrained weights {member} classify the {categories} ImageNet-1k classes but the model is built for "
            f"{num_classes} classes (model.num_classes, linked from the data). Use them on ImageNet-1k, or set "
            f"model.weights null to start from random weights."
        )
    return member


def download_weights(member) -> StateDict:
    """torchvision's state dict for ``member`` from torch.hub's cache, downloading it when it is not there.

    ``torch.hub.load_state_dict_from_url`` is looked up at call time (not imported by name) so tests can take the
    network away.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    filename = Path(member.url).name
    try:
        return torch.hub.load_state_dict_from_url(
            member.url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except OSError as err:  # URLError (offline), timeouts, a read-only cache
        raise CheckpointError(
            f"Cannot load the pretrained weights {member}: {filename} is not in the cache folder {cache} and "
            f"downloading {member.url} failed ({err}). Without network access, download the file elsewhere and copy "
            f"it into {cache}, or pass --model.weights <path to .pth> (a local state dict)."
        ) from err
    except Exception as err:  # a hash mismatch or a truncated cached file
        raise CheckpointError(
            f"The pretrained weights {member} in {cache / filename} are corrupt ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Delete the file so that it is downloaded again from {member.url}."
        ) from err


def read_state_dict(path: Path) -> StateDict:
    """A state dict from a local file: a plain one, or nested under ``state_dict`` (a Lightning checkpoint of this
    project, whose backbone keys start with ``backbone.``) or ``model`` (torchvision's training scripts)."""
    if not path.is_file():
        raise CheckpointError(
            f"Weights file {path} does not exist. model.weights takes a torchvision weights name (DEFAULT, "
            f"IMAGENET1K_V1, ...) or the path of a local .pth/.pt state dict."
        )
    loaded = load_state_dict(path)
    if loaded and all(k.startswith("backbone.") for k in loaded):
        loaded = {k.removeprefix("backbone."): v for k, v in loaded.items()}
    return dict(loaded)


# ------------------------------------------------------------------------------------------------ backbones
class TorchvisionBackbone(Backbone):
    """A torchvision classifier split into ``net`` (features) and ``head``.

    Subclasses name the torchvision builder (``arch``), the module path of the head's Linear (``head_path``) and the
    attribute of the network replaced by ``Identity`` to take the head out (``head_owner``), and list their blocks.

    Args:
        num_classes: output classes of the head; pretrained weights need the 1000 ImageNet-1k classes.
        weights: ``None`` (random initialisation), a torchvision weights name of ``arch`` (``DEFAULT``,
            ``IMAGENET1K_V1``, ...), or the path of a local ``.pth``/``.pt`` state dict with torchvision's keys or
            this backbone's own (``net.*``, ``head.*``).
    """

    arch: str
    head_path: str
    head_owner: str

    def __init__(self, num_classes: int = 1000, weights: str | None = None) -> None:
        super().__init__()
        state, source = None, None
        if weights is not None:
            if is_weights_name(weights):
                member = weights_member(self.arch, weights, num_classes)
                state, source = download_weights(member), str(member)
            else:
                path = Path(weights).expanduser()
                state, source = self.torchvision_keys(read_state_dict(path)), f"Weights file {path}"
        net = self.build(num_classes, state)
        if state is not None:
            fits = f"torchvision's {self.arch} (torchvision's keys or this backbone's own: net.*, head.*)"
            load_checked(net, state, f"{self.head_path}.weight", source, fits)
        self.head: nn.Linear = net.get_submodule(self.head_path)
        setattr(net, self.head_owner, nn.Identity())
        self.net = net
        self.feature_dim = self.head.in_features

    def build(self, num_classes: int, state: StateDict | None) -> nn.Module:
        """torchvision's model, randomly initialised (the weights are loaded afterwards)."""
        return getattr(torchvision.models, self.arch)(weights=None, num_classes=num_classes)

    def torchvision_keys(self, state: StateDict) -> StateDict:
        """A state dict with this backbone's keys (``net.*``, ``head.*``) renamed to torchvision's; others as given."""
        if not state or not all(k.startswith(("net.", "head.")) for k in state):
            return state
        return {
            k.removeprefix("net.") if k.startswith("net.") else f"{self.head_path}.{k.removeprefix('head.')}": v
            for k, v in state.items()
        }

    def features(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, L)
        return self.net(x)  # the head is an Identity inside net


class ResNet50(TorchvisionBackbone):
    """torchvision's ResNet-50 (He et al., 2016): 2048-d features after the last bottleneck's ReLU and pooling."""

    arch, head_path, head_owner = "resnet50", "fc", "fc"

    def blocks(self) -> dict[str, nn.Module]:
        stages = (f"layer{i}" for i in range(1, 5))
        return {f"{s}.{j}": block for s in stages for j, block in enumerate(self.net.get_submodule(s))}

    def last_batchnorm(self) -> BatchNormTail:
        """``bn3`` of the last bottleneck, then the residual addition (identity or ``downsample``), ReLU, pooling."""
        name = f"net.layer4.{len(self.net.layer4) - 1}"
        block = self.net.get_submodule(name.removeprefix("net."))
        identity = f"{name}.downsample" if block.downsample is not None else f"{name}:input"

        def activation(z: Tensor, captured: dict[str, Tensor]) -> Tensor:
            return torch.relu(z + captured[identity])

        return BatchNormTail(f"{name}.bn3", block.bn3, (identity,), activation)

    def stages(self) -> list[str]:
        return [f"net.layer{i}" for i in range(1, 5)]


class MobileNetV2(TorchvisionBackbone):
    """torchvision's MobileNetV2 (Sandler et al., 2018): 1280-d features after the final ReLU6 and pooling.

    torchvision's classifier is Dropout(0.2) + Linear; the Dropout is kept for training only, so in eval mode
    ``forward(x) == head(features(x))`` exactly.
    """

    arch, head_path, head_owner = "mobilenet_v2", "classifier.1", "classifier"

    def __init__(self, num_classes: int = 1000, weights: str | None = None) -> None:
        super().__init__(num_classes, weights)
        self.dropout = nn.Dropout(p=0.2)  # torchvision's classifier[0]

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, C)
        return self.head(self.dropout(self.features(x)))

    def blocks(self) -> dict[str, nn.Module]:
        layers = self.net.features  # [0] is the stem convolution, [18] the final 1x1 convolution
        return {f"features.{i}": layers[i] for i in range(1, len(layers) - 1)}

    def last_batchnorm(self) -> BatchNormTail:
        """The BatchNorm of the final 1x1 convolution, then ReLU6 and global average pooling."""
        last = len(self.net.features) - 1
        bn = self.net.features[last][1]

        return BatchNormTail(f"net.features.{last}.1", bn, (), lambda z, _: nn.functional.relu6(z))


class ViTB16(TorchvisionBackbone):
    """torchvision's ViT-B/16 (Dosovitskiy et al., 2021): the 768-d class token after the final LayerNorm.

    The input resolution is fixed by the positional embeddings: 224 without weights, otherwise that of the weights
    (384 for ``IMAGENET1K_SWAG_E2E_V1``); ``image_size`` says which.
    """

    arch, head_path, head_owner = "vit_b_16", "heads.head", "heads"
    patch_size = 16

    def build(self, num_classes: int, state: StateDict | None) -> nn.Module:
        image_size = 224
        if state is not None and "encoder.pos_embedding" in state:
            tokens = state["encoder.pos_embedding"].shape[1] - 1  # patches + the class token
            image_size = math.isqrt(tokens) * self.patch_size
        return torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=image_size)

    @property
    def image_size(self) -> int:
        return self.net.image_size

    def features(self, x: Tensor) -> Tensor:  # (N, 3, S, S) -> (N, 768)
        self.check_image_size(x, self.image_size, "vit_b_16 with these weights",
                              f"set --data.image_size {self.image_size} (ImageNetDataModule)")  # fmt: skip
        return self.net(x)

    def blocks(self) -> dict[str, nn.Module]:
        return {f"encoder.layers.{name}": layer for name, layer in self.net.encoder.layers.named_children()}


def resnet50(num_classes: int = 1000, weights: str | None = None) -> ResNet50:
    """torchvision ResNet-50: 2048-d features (``weights``: ``DEFAULT`` = ``IMAGENET1K_V2``, or ``IMAGENET1K_V1``)."""
    return ResNet50(num_classes, weights)


def mobilenet_v2(num_classes: int = 1000, weights: str | None = None) -> MobileNetV2:
    """torchvision MobileNetV2: 1280-d features (``weights``: ``DEFAULT`` = ``IMAGENET1K_V2``, or ``IMAGENET1K_V1``)."""
    return MobileNetV2(num_classes, weights)


def vit_b_16(num_classes: int = 1000, weights: str | None = None) -> ViTB16:
    """torchvision ViT-B/16: 768-d features (``weights``: ``DEFAULT`` = ``IMAGENET1K_V1``, ``IMAGENET1K_SWAG_E2E_V1``
    at 384 px, ``IMAGENET1K_SWAG_LINEAR_V1``)."""
    return ViTB16(num_classes, weights)
