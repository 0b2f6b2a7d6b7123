"""Mahalanobis distance to the closest class mean under one shared covariance (Lee et al., NeurIPS 2018), as in
OpenOOD's ``mds`` postprocessor: penultimate features only, no input perturbation, no ensemble of layers.

Not the paper's Table I "Mahalanobis": its code adds Lee et al.'s layers, input noise and a logistic regression
(``mahalanobis_paper``, :mod:`lightning_ood.scoring.ensemble`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.errors import FitError
from lightning_ood.linalg import spectrum
from lightning_ood.scoring.base import Scorer
from lightning_ood.statistics import FeatureStatistics


class Mahalanobis(Scorer):
    """``score = max_c -(h - mu_c)^T P (h - mu_c)`` with P the pseudo-inverse of the tied within-class covariance
    (a singular covariance, from dead or duplicated units or fewer images than units, has its rounding noise treated
    as zero, :mod:`lightning_ood.linalg`; a covariance that is zero up to rounding is refused). Computed in float64:
    the expansion ``hPh - 2 hP mu + mu P mu`` cancels badly in float32."""

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Mahalanobis:
        super().fit_statistics(stats, head)
        self.terms = mahalanobis_terms(stats.class_means, stats.covariance, stats.counts)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        distance = squared_distances(features.double(), *self.terms)  # (N, C)
        return -distance.min(dim=1).values


def mahalanobis_terms(means: Tensor, covariance: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(centre, means - centre, precision, mu_c^T P mu_c)`` in float64 for fast distances, from the class means
    (K, L), their shared covariance and the training images per class ``counts`` (K,) it was estimated from (K = 1:
    the Gaussian of all images). The precision is the pseudo-inverse with rounding noise as zero (singular is fine).
    Distances are taken around the training features' mean (the centre): far from the origin, the expansion
    ``hPh - 2 hP mu + mu P mu`` would lose to float64 rounding what an ill-conditioned P resolves.

    Raises:
        FitError: the covariance is zero up to rounding (every class has one image, or copies of one).
    """
    means = means.double()
    found = spectrum(covariance)
    if found.rank == 0:
        raise FitError(zero_covariance(counts))
    precision = found.pinv().to(means.device)
    weights = counts.to(means.device, torch.float64)
    centre = weights @ means / weights.sum()  # (L,)
    centred = means - centre
    return centre, centred, precision, ((centred @ precision) * centred).sum(1)


def zero_covariance(counts: Tensor) -> str:
    """Why a covariance estimated from ``counts`` images per class (K,) is zero, and what its fit needs."""
    counts = counts.long().cpu()
    n, k = int(counts.sum()), len(counts)
    if k == 1:
        return (
            f"the covariance of its {n} training image{'s' * (n != 1)} is zero up to rounding: it needs at least "
            f"two different images"
        )
    per_class = "one image each" if int(counts.max()) == 1 else f"at most {int(counts.max())} per class"
    return (
        f"the within-class covariance of its {n} training images ({k} classes, {per_class}) is zero up to rounding: "
        f"it needs two different images of one class at least ({k + 1} images or more)"
    )


def squared_distances(h: Tensor, centre: Tensor, means: Tensor, precision: Tensor, mean_term: Tensor) -> Tensor:
    """``(N, K)`` squared Mahalanobis distances of ``h`` (N, L) to each mean, as one (N, L) x (L, L) product around
    the centre (:func:`mahalanobis_terms`)."""
    h = h - centre
    hp = h @ precision  # (N, L)
    return (hp * h).sum(1, keepdim=True) - 2 * hp @ means.T + mean_term  # (N, K)


class RMDS(Scorer):
    """Relative Mahalanobis distance (Ren et al., 2021): ``max_c -(d_c(h) - d_0(h))``, with ``d_c`` the squared
    distance to class c under the shared within-class covariance and ``d_0`` the distance to the class-agnostic
    Gaussian of all training features (their mean and covariance), as OpenOOD's ``rmds``."""

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> RMDS:
        super().fit_statistics(stats, head)
        self.class_terms = mahalanobis_terms(stats.class_means, stats.covariance, stats.counts)
        self.background = mahalanobis_terms(stats.mean[None, :], stats.total_covariance, stats.counts.sum()[None])
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        h = features.double()
        d = squared_distances(h, *self.class_terms)  # (N, C)
        d0 = squared_distances(h, *self.background)  # (N, 1)
        return -(d - d0).min(dim=1).values
