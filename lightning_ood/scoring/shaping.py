"""Activation shaping of the penultimate features before the head: ReAct and BATS."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ood.scoring.base import LogitScorer, check_nonnegative, check_percentile
from lightning_ood.statistics import FeatureStatistics


class ReAct(LogitScorer):
    """Rectified activations (Sun et al., NeurIPS 2021): ``h <- min(h, c)``, then energy (or MSP).

    ``c`` is the ``percentile``-th percentile of all training activations (all units, all images; the authors take it
    on ID validation images, which gives nearly the same value), or the absolute ``clip`` when given.
    """

    def __init__(self, percentile: float = 90.0, clip: float | None = None, output: str = "energy") -> None:
        super().__init__(output)
        check_percentile("percentile", percentile)
        check_nonnegative("clip", clip)
        self.percentile = percentile
        self.clip = clip

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> ReAct:
        super().fit_statistics(stats, head)
        self.threshold = self.clip if self.clip is not None else stats.activation_percentile(self.percentile)
        return self

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        return self.head_logits(features.clamp(max=self.threshold))


class BATS(LogitScorer):
    """Boundary-aware typical-feature shaping (Zhu et al., NeurIPS 2022), on the pooled penultimate features as in the
    authors' CIFAR example: each unit is truncated to ``[mu - lam * sigma, mu + lam * sigma]`` with the training mean
    and standard deviation of that unit, then energy. ``lam = 3.25`` is the authors' CIFAR-10 ResNet-18 value.
    """

    def __init__(self, lam: float = 3.25, output: str = "energy") -> None:
        super().__init__(output)
        check_nonnegative("lam", lam)
        self.lam = lam

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> BATS:
        super().fit_statistics(stats, head)
        mean, std = stats.mean.float(), stats.std.float()
        self.lower = mean - self.lam * std  # (L,)
        self.upper = mean + self.lam * std  # (L,)
        return self

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        return self.head_logits(features.clamp(min=self.lower, max=self.upper))
