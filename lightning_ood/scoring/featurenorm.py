"""FeatureNorm as a scorer: the norm of an intermediate block's output (Yu et al., CVPR 2023)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.featurenorm import NormRatios, feature_norm, norm_ratios
from lightning_ood.hooks import unknown_blocks
from lightning_ood.scoring.base import Batch, Scorer

NORMRATIO_IMAGES: int | None = None  # training images that choose the block: None all (the authors), N a seeded subset


class FeatureNorm(Scorer):
    """Channel-average of the spatial L2 norms of ``ReLU(block output)``; higher = more in-distribution.

    ``block`` names one of ``backbone.blocks()``; ``None`` lets the test pass choose it by NormRatio on jigsaw-shuffled
    ID training images, un-normalised as the authors feed them (:mod:`lightning_ood.featurenorm`): all of them, as the
    authors, or a seeded subset of ``normratio_images`` (``lightning-ood normratio`` does the same once and writes the
    choice as a config overlay). The module reads the block's output with a forward hook during the same forward pass
    as the penultimate features.
    """

    def __init__(self, block: str | None = None, normratio_images: int | None = NORMRATIO_IMAGES) -> None:
        super().__init__()
        if normratio_images is not None and (
            isinstance(normratio_images, bool) or not isinstance(normratio_images, int) or normratio_images < 1
        ):
            raise ConfigError(
                f"featurenorm normratio_images must be a count >= 1, or none (every training image, as the authors); "
                f"got {normratio_images!r}."
            )
        self.block = block
        self.normratio_images = normratio_images

    def bind(self, backbone: nn.Module) -> FeatureNorm:
        if self.block is not None and unknown_blocks([self.block], backbone.blocks(), dict(backbone.named_modules())):
            raise ConfigError(
                f"featurenorm block {self.block!r} is not a block of {type(backbone).__name__}: one of "
                f"{', '.join(backbone.blocks())}, or none (NormRatio chooses)."
            )
        return self

    def prepare(self, context) -> FeatureNorm:
        """With no block configured, choose it by NormRatio on the ID training images, all or a seeded subset of
        ``normratio_images`` (one measurement per run and count, shared by the FeatureNorm scorers of the run)."""
        if self.block is not None:
            return self
        if context is None or context.training_images is None:
            raise ConfigError(
                "featurenorm without a block chooses one by NormRatio on ID training images, which this run does not "
                "have: name the block ({scorer: featurenorm, block: <name>}, or run `lightning-ood normratio`)."
            )

        def measure() -> NormRatios:
            result = norm_ratios(
                context.backbone, context.training_images(self.normratio_images, 0), seed=0,
                sum_across=context.sum_across, normalization=context.normalization,
            )  # fmt: skip
            table = ", ".join(f"{name} {ratio:.3f}" for name, ratio in result.ratios.items())
            context.log(
                f"NormRatio on {result.images} ID training images: {table}. FeatureNorm block: {result.selected}."
            )
            return result

        self.block = context.shared(f"normratio:{self.normratio_images}", measure).selected
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return (self.block,) if self.block is not None else ()

    def forward(self, batch: Batch) -> Tensor:  # {block: map} -> (N,)
        if self.block is None:
            raise ConfigError("featurenorm has no block: name one, or let NormRatio choose it (prepare).")
        return feature_norm(batch.blocks[self.block])
