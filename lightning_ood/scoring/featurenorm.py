"""FeatureNorm as a scorer: the norm of an intermediate block's output (Yu et al., CVPR 2023)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.featurenorm import feature_norm, unknown_blocks
from lightning_ood.scoring.base import Scorer


class FeatureNorm(Scorer):
    """Channel-average of the spatial L2 norms of ``ReLU(block output)``; higher = more in-distribution.

    ``block`` names one of ``backbone.blocks()``; ``None`` lets the test pass choose it by NormRatio on jigsaw-shuffled
    ID training images (``lightning-ood normratio`` does the same once and writes the choice as a config overlay).
    The module reads the block's output with a forward hook during the same forward pass as the penultimate features.
    """

    def __init__(self, block: str | None = None) -> None:
        self.block = block

    def bind(self, backbone: nn.Module) -> FeatureNorm:
        if self.block is not None and unknown_blocks([self.block], backbone.blocks(), dict(backbone.named_modules())):
            raise ConfigError(
                f"featurenorm block {self.block!r} is not a block of {type(backbone).__name__}: one of "
                f"{', '.join(backbone.blocks())}, or none (NormRatio chooses)."
            )
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return (self.block,) if self.block is not None else ()

    def score_blocks(self, outputs: dict[str, Tensor], features=None, logits=None) -> Tensor:  # {block: map} -> (N,)
        return feature_norm(outputs[self.block])

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        raise TypeError("FeatureNorm scores a block's output: call score_blocks(outputs, features, logits)")
