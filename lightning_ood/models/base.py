"""The backbone contract: ``features(x) -> (N, L)``, ``head: nn.Linear``, ``forward = head o features``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_ood.errors import ConfigError


@dataclass(frozen=True)
class BatchNormTail:
    """The last BatchNorm before the pooled features, and how the features follow from its output.

    Lets a method change that BatchNorm's output (BATS truncates it to its typical set) or the final feature map
    (ASH, SCALE, RankFeat) and re-run only the rest of the network, on outputs captured in the one forward pass:
    ``activation(bn_output, captured) -> (N, C, H, W)`` is the final feature map (the residual addition and ReLU of
    a ResNet, the ReLU of a DenseNet), and the pooled features are its global average. ``captured`` holds the outputs
    of the modules named in ``context`` (``"<module>:input"`` for a module's input).
    """

    name: str
    bn: nn.BatchNorm2d
    context: tuple[str, ...]
    activation: Callable[[Tensor, dict[str, Tensor]], Tensor]

    @property
    def captures(self) -> tuple[str, ...]:
        """The module outputs a scorer must capture: the BatchNorm and its context."""
        return (self.name, *self.context)

    def feature_map(self, captured: dict[str, Tensor]) -> Tensor:  # -> (N, C, H, W)
        return self.activation(captured[self.name], captured)

    def tail(self, z: Tensor, captured: dict[str, Tensor]) -> Tensor:  # (N, C, H, W) BN output -> (N, C)
        return pool(self.activation(z, captured))


def pool(feature_map: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C)
    """Global average pooling, as every backbone here pools its final feature map."""
    return feature_map.mean(dim=(2, 3))


class Backbone(nn.Module):
    """An image classifier split into a feature extractor and a linear head.

    Subclasses build ``self.head = nn.Linear(feature_dim, num_classes)`` and implement :meth:`features`, returning the
    globally pooled penultimate representation after the final non-linearity. OOD scorers only ever see these two
    pieces, so no OOD logic lives in a backbone.
    """

    feature_dim: int
    head: nn.Linear

    def features(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, L)
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, C)
        return self.head(self.features(x))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def blocks(self) -> dict[str, nn.Module]:
        """Candidate intermediate blocks by name, in forward order (used by FeatureNorm block selection)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its blocks")

    def last_batchnorm(self) -> BatchNormTail | None:
        """The last BatchNorm before the features (``None`` for networks without one, such as ViT)."""
        return None

    def require_last_batchnorm(self, refusal: str) -> BatchNormTail:
        """:meth:`last_batchnorm`, or a :class:`ConfigError` of ``refusal`` (what needs it, and the way out;
        ``{network}`` is replaced by the backbone's class name)."""
        point = self.last_batchnorm()
        if point is None:
            raise ConfigError(refusal.format(network=type(self).__name__))
        return point

    def check_image_size(self, x: Tensor, size: int, name: str, hint: str) -> None:
        """Refuse images that are not ``size`` x ``size`` (a network with a fixed input size), naming ``hint``."""
        if tuple(x.shape[-2:]) != (size, size):
            raise ConfigError(f"{name} takes {size}x{size} images but got {x.shape[-2]}x{x.shape[-1]}; {hint}.")

    def stages(self) -> list[str]:
        """The layers of Lee et al.'s ``feature_list`` (their Mahalanobis layer ensemble), in forward order, as module
        names (``"<module>:input"`` for a module's input) whose outputs are those layers; empty when the backbone
        does not define them."""
        return []
