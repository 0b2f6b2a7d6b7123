"""Scores from the geometry of the head and the class means: fDBD, NCI and SHE."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.scoring.base import Scorer, check_nonnegative
from lightning_ood.statistics import FeatureStatistics, LogitStatistics


class FDBD(Scorer):
    """Fast decision-boundary distance (Liu & Qin, ICML 2024): the mean over classes c other than the prediction of
    the feature's distance to the boundary between the two, ``|f_pred - f_c| / ||w_pred - w_c||``, divided by the
    distance ``||h - mean_train||`` to the training features' mean. (OpenOOD sums instead of averaging: the same
    order.)

    Args:
        normalizer: ``mean`` (the paper: ``||h - mean_train||``) or ``norm`` (``||h||``, OpenOOD's other option).
    """

    search_space: ClassVar[dict[str, tuple]] = {"normalizer": ("mean", "norm")}

    def __init__(self, normalizer: str = "mean") -> None:
        super().__init__()
        from lightning_ood.scoring.logits import check_choice

        self.normalizer = check_choice("normalizer", normalizer, ("mean", "norm"))

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> FDBD:
        super().fit_statistics(stats, head)
        w = self.weight.double()
        self.pair_norms = torch.cdist(w, w).clamp_min(1e-12)  # (C, C): ||w_a - w_b||
        self.center = stats.mean.to(self.weight.dtype) if self.normalizer == "mean" else None
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        z = logits.double()
        predicted = z.argmax(dim=1)
        gaps = (z.gather(1, predicted[:, None]) - z).abs() / self.pair_norms[predicted]  # (N, C); 0 at the prediction
        boundary = gaps.sum(dim=1) / (z.shape[1] - 1)
        h = features if self.center is None else features - self.center
        return boundary / h.double().norm(dim=1).clamp_min(1e-12)


class NCI(Scorer):
    """Neural-collapse inspired detection (Liu et al., CVPR 2025, as OpenOOD's ``nci``): the alignment of the centred
    feature with its predicted class's weight, ``<w_pred, h - mean_train> / ||h - mean_train||``, plus
    ``alpha * ||h||_1`` (1e-4)."""

    search_space: ClassVar[dict[str, tuple]] = {"alpha": (0.0001, 0.001, 0.01, 0.1)}

    def __init__(self, alpha: float = 1e-4) -> None:
        super().__init__()
        check_nonnegative("alpha", alpha)
        self.alpha = alpha

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> NCI:
        super().fit_statistics(stats, head)
        self.center = stats.mean.to(self.weight.dtype)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        centred = features - self.center
        w = self.weight[logits.argmax(dim=1)]  # (N, L): one row per sample, as the definition reads it
        alignment = (w * centred).sum(dim=1) / centred.norm(dim=1).clamp_min(1e-12)
        return alignment + self.alpha * features.abs().sum(dim=1)


class SHE(Scorer):
    """Simplified Hopfield energy (Zhang et al., ICLR 2023): ``<h, pattern_pred>``, the pattern of a class being the
    mean feature of its correctly classified training images (OpenOOD's ``inner_product`` metric)."""

    needs_statistics = frozenset({LogitStatistics})

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> SHE:
        super().fit_statistics(stats, head)
        self.patterns = stats.correct_means.to(self.weight.dtype)  # (C, L); zero for a class never right
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return (features * self.patterns[logits.argmax(dim=1)]).sum(dim=1)
