"""Mahalanobis distance to the closest class mean under one shared covariance (Lee et al., NeurIPS 2018), as in
OpenOOD's ``mds`` postprocessor: penultimate features only, no input perturbation, no ensemble of layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.scoring.base import Scorer
from lightning_ood.statistics import FeatureStatistics


class Mahalanobis(Scorer):
    """``score = max_c -(h - mu_c)^T P (h - mu_c)`` with P the pseudo-inverse of the tied within-class covariance
    (a singular covariance, e.g. from dead units, does not fail). Computed in float64: the expansion
    ``hPh - 2 hP mu + mu P mu`` cancels badly in float32."""

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Mahalanobis:
        super().fit_statistics(stats, head)
        self.means = stats.class_means.double()  # (C, L)
        self.precision = torch.linalg.pinv(stats.covariance.double(), hermitian=True)  # (L, L)
        self.mean_term = ((self.means @ self.precision) * self.means).sum(1)  # (C,) mu_c^T P mu_c
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        h = features.double()
        hp = h @ self.precision  # (N, L)
        distance = (hp * h).sum(1, keepdim=True) - 2 * hp @ self.means.T + self.mean_term  # (N, C)
        return (-distance.min(dim=1).values).to(features.dtype)
