"""The backbone contract: ``features(x) -> (N, L)``, ``head: nn.Linear``, ``forward = head o features``."""

from __future__ import annotations

from torch import Tensor, nn


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
