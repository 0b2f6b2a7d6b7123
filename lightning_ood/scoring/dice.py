"""DICE: directed sparsification of the classifier head (Sun & Li, ECCV 2022)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ood.scoring.base import LogitScorer, check_nonnegative, check_percentile, check_reference
from lightning_ood.statistics import FeatureStatistics, percentile


class DICE(LogitScorer):
    """Keep the head weights whose contribution ``W * mean_train_h`` lies strictly above ONE global percentile ``p``
    over all ``C x L`` contributions; the bias is kept whole; energy of the sparsified head.

    With ``clip_percentile`` (a percentile of the ``reference`` images' activations, as in
    :class:`~lightning_ood.scoring.shaping.ReAct`) or an absolute ``clip`` the features are first clipped as in ReAct:
    DICE+ReAct (the DICE authors' ImageNet setting: p = 10, clip 1.0). The contribution matrix always uses the
    unclipped training mean, as in the authors' code.
    """

    def __init__(
        self,
        percentile: float = 90.0,
        clip_percentile: float | None = None,
        clip: float | None = None,
        reference: str = "train",
        output: str = "energy",
    ) -> None:
        super().__init__(output)
        check_percentile("percentile", percentile)
        check_percentile("clip_percentile", clip_percentile)
        check_nonnegative("clip", clip)
        self.percentile = percentile
        self.clip_percentile = clip_percentile
        self.clip = clip
        check_reference(reference)
        self.reference = reference if clip is None and clip_percentile is not None else "train"  # used only then

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> DICE:
        super().fit_statistics(stats, head)
        contribution = self.weight * stats.mean.to(self.weight.dtype)[None, :]  # (C, L)
        keep = contribution > percentile(contribution, self.percentile)  # strict, one global threshold
        self.sparse_weight = self.weight * keep
        if self.clip is not None:
            self.threshold = self.clip
        elif self.clip_percentile is not None:
            self.threshold = stats.activation_percentile(self.clip_percentile, self.reference)
        else:
            self.threshold = None
        return self

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        if self.threshold is not None:
            features = features.clamp(max=self.threshold)
        return features @ self.sparse_weight.T + self.bias
