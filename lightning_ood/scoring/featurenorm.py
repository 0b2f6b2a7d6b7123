"""FeatureNorm as a scorer: the norm of an intermediate block's output (Yu et al., CVPR 2023)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.featurenorm import NormRatios, feature_norm, norm_ratios
from lightning_ood.hooks import unknown_blocks
from lightning_ood.scoring.base import Batch, Scorer

NORMRATIO_IMAGES = 2000  # ID training images used to choose the block (a seeded subset)


class FeatureNorm(Scorer):
    """Channel-average of the spatial L2 norms of ``ReLU(block output)``; higher = more in-distribution.

    ``block`` names one of ``backbone.blocks()``; ``None`` lets the test pass choose it by NormRatio on jigsaw-shuffled
    ID training images (``lightning-ood normratio`` does the same once and writes the choice as a config overlay).
    The module reads the block's output with a forward hook during the same forward pass as the penultimate features.
    """

    def __init__(self, block: str | None = None) -> None:
        super().__init__()
        self.block = block

    def bind(self, backbone: nn.Module) -> FeatureNorm:
        if self.block is not None and unknown_blocks([self.block], backbone.blocks(), dict(backbone.named_modules())):
            raise ConfigError(
                f"featurenorm block {self.block!r} is not a block of {type(backbone).__name__}: one of "
                f"{', '.join(backbone.blocks())}, or none (NormRatio chooses)."
            )
        return self

    def prepare(self, context) -> FeatureNorm:
        """With no block configured, choose it by NormRatio on a seeded subset of ``NORMRATIO_IMAGES`` ID training
        images (one measurement per run, shared by every FeatureNorm scorer of the run)."""
        if self.block is not None:
            return self
        if context is None or context.training_images is None:
            raise ConfigError(
                "featurenorm without a block chooses one by NormRatio on ID training images, which this run does not "
                "have: name the block ({scorer: featurenorm, block: <name>}, or run `lightning-ood normratio`)."
            )

        def measure() -> NormRatios:
            result = norm_ratios(
                context.backbone, context.training_images(NORMRATIO_IMAGES, 0), seed=0,
                sum_across=context.sum_across, normalization=context.normalization,
            )  # fmt: skip
            table = ", ".join(f"{name} {ratio:.3f}" for name, ratio in result.ratios.items())
            context.log(
                f"NormRatio on {result.images} ID training images: {table}. FeatureNorm block: {result.selected}."
            )
            return result

        self.block = context.shared("normratio", measure).selected
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return (self.block,) if self.block is not None else ()

    def forward(self, batch: Batch) -> Tensor:  # {block: map} -> (N,)
        if self.block is None:
            raise ConfigError("featurenorm has no block: name one, or let NormRatio choose it (prepare).")
        return feature_norm(batch.blocks[self.block])
