"""Mahalanobis++ and RMDS++ (Mueller & Hein, ICML 2025): Mahalanobis and relative Mahalanobis distances on
L2-normalised penultimate features, with the class means and covariances of the normalised training features.

As the authors' code (mueller-mp/maha-norm): ``NINCO/detection_methods.py`` ``evaluate_Mahalanobis_norm`` and
``evaluate_Relative_Mahalanobis_norm``, and their OpenOOD postprocessors ``mdsn_postprocessor.py`` and
``rmdsn_postprocessor.py`` (the CIFAR path, ``OpenOOD/eval_cifar.py``): every feature, training and test, is divided by
its L2 norm; the class means and the tied covariance (maximum likelihood, ``EmpiricalCovariance``), and for RMDS++ the
mean and covariance of all normalised training features, are those of the normalised features; the precision is the
pseudo-inverse (``pinvh``). No hyperparameters.

The normalised features' Gaussians come from the one statistics pass (``unit_gaussians``: per-class means of
``h / ||h||`` and their scatter around them, merged exactly under DDP), not from a second pass over the training set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring.base import Scorer
from lightning_ood.scoring.mahalanobis import mahalanobis_terms, squared_distances
from lightning_ood.statistics import (
    ClassGaussians,
    FeatureStatistics,
    Reducers,
    Statistic,
    StatisticsBatch,
    StatisticsSetup,
    between_scatter,
)


class UnitGaussians(Statistic):
    """``unit_gaussians``: the class means and the within-class covariance of the L2-normalised training features
    ``u = h / ||h||`` (Mahalanobis++ and RMDS++), accumulated around the class means (:class:`ClassGaussians`) and
    merged across batches and DDP ranks."""

    name = "unit_gaussians"
    fields = ("unit_class_means", "unit_covariance")

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        self.gaussians = ClassGaussians(setup.num_classes, setup.feature_dim)

    def update(self, batch: StatisticsBatch) -> None:
        self.gaussians.update(unit(batch.features.detach().to("cpu", torch.float64)), batch.labels)  # (B, L)

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        counts, means, scatter = self.gaussians.reduce(reduce)
        return {"unit_class_means": means, "unit_covariance": scatter / counts.sum()}


def unit(h: Tensor) -> Tensor:  # (N, L) -> rows divided by their L2 norm (a zero row stays zero)
    return F.normalize(h, dim=1)


class MahalanobisPP(Scorer):
    """Mahalanobis++: ``max_c -(u - mu_c)^T P (u - mu_c)`` with ``u = h / ||h||``, ``mu_c`` the class means of the
    normalised training features and ``P`` the pseudo-inverse of their tied within-class covariance. In float64, as
    the authors score. (A zero feature vector, which the authors' division turns into NaN, is kept at zero.)"""

    needs_statistics = frozenset({UnitGaussians})

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> MahalanobisPP:
        super().fit_statistics(stats, head)
        means, within, _, _ = unit_gaussians(stats, "mahalanobis_pp")
        self.terms = mahalanobis_terms(means, within, stats.counts)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        d = squared_distances(unit(features.double()), *self.terms)  # (N, C)
        return -d.min(dim=1).values


class RMDSPP(Scorer):
    """RMDS++: ``max_c -(d_c(u) - d_0(u))`` on ``u = h / ||h||``, ``d_c`` the squared distance to class c under the
    normalised features' tied covariance and ``d_0`` the distance to the Gaussian of all normalised training features
    (their mean and covariance), as :class:`~lightning_ood.scoring.mahalanobis.RMDS` on normalised features.

    The authors' ``evaluate_Relative_Mahalanobis_norm`` fits the class-agnostic Gaussian on the normalised features
    only when it computes the class Gaussians in the same call; with the class Gaussians loaded from its cache (as
    after ``evaluate_Mahalanobis_norm``), it fits it on the raw features. Here, as their OpenOOD ``rmdsn``, always on
    the normalised ones."""

    needs_statistics = frozenset({UnitGaussians})

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> RMDSPP:
        super().fit_statistics(stats, head)
        means, within, mean, total = unit_gaussians(stats, "rmds_pp")
        self.class_terms = mahalanobis_terms(means, within, stats.counts)
        self.background = mahalanobis_terms(mean[None, :], total, stats.counts.sum()[None])
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        u = unit(features.double())
        d = squared_distances(u, *self.class_terms)  # (N, C)
        d0 = squared_distances(u, *self.background)  # (N, 1)
        return -(d - d0).min(dim=1).values


def unit_gaussians(stats: FeatureStatistics, scorer: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(class means (C, L), within-class covariance (L, L), mean (L,), total covariance (L, L))`` of the normalised
    training features, in float64, from the statistics' ``unit_gaussians``."""
    if "unit_class_means" not in stats.extras:
        raise ConfigError(
            f"{scorer} needs the 'unit_gaussians' statistics, which these statistics lack: fit them again."
        )
    counts = stats.counts.double().cpu()
    means = stats.unit_class_means.double().cpu()  # (C, L)
    within = stats.unit_covariance.double().cpu()  # (L, L)
    mean, between = between_scatter(counts, means)
    return means, within, mean, within + between / counts.sum()
