"""NECO (Ben Ammar et al., ICLR 2024): the share of a standardised feature's norm that lies in the principal subspace
of the standardised training features, ``||P_d z|| / ||z||`` (times the max logit for transformers).

As the authors' code (gitlab.com/drti/neco, ``ood_methods.py`` ``neco``, called by ``test_all_ood.py``):
``StandardScaler`` fitted on the training features (mean and population std; a constant unit keeps scale 1), then
``PCA`` (all components) fitted on the standardised training features; a test feature ``z = (h - mean) / std`` is
projected on the first ``neco_dim`` components, and the score is the norm of the projection over the norm of ``z``.
Their ``model_architecture_type`` picks the rest: ``resnet`` nothing more; ``vit`` times the max logit; ``deit``
and ``swin`` times the max logit, with the norm of the raw feature ``h`` in the denominator.

The standardised training features' covariance, whose eigenvectors are PCA's components, is the training features'
covariance scaled by the stds, ``D^-1 Sigma D^-1``: both are core statistics, so nothing beyond them is fitted.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError, FitError
from lightning_ood.linalg import spectrum
from lightning_ood.scoring.base import Scorer, as_float, check_count
from lightning_ood.statistics import FeatureStatistics

VARIANTS = ("resnet", "vit", "deit", "swin")  # the authors' model_architecture_type


def default_dim(feature_dim: int) -> int:
    """The authors' ``neco_dim``: 100 (``test_all_ood.py``'s default), for every network they report (512-d ResNets to
    2048-d); half the features below 200 (ours, for small networks such as ResNet-20's 64)."""
    return 100 if feature_dim >= 200 else max(1, feature_dim // 2)


def standardiser(stats: FeatureStatistics) -> tuple[Tensor, Tensor]:
    """``(mean, scale)`` of sklearn's ``StandardScaler`` fitted on the training features, in float64: the population
    std, 1 where a unit is constant (its variance zero up to the rounding of the sums)."""
    mean = stats.mean.double().cpu()
    var = stats.std.double().cpu() ** 2
    second = var + mean * mean  # E[h^2], the size of the sums the variance was computed from
    constant = var <= 64 * torch.finfo(torch.float64).eps * second
    return mean, torch.where(constant, 1.0, var.sqrt())


class NECO(Scorer):
    """``score = ||z V_d|| / ||z||`` with ``z = (h - mean) / std`` and ``V_d`` the top-``dim`` eigenvectors of the
    standardised training features' covariance; for ``variant`` ``vit``, ``deit``, ``swin`` times the max logit, and
    for ``deit`` and ``swin`` over ``||h||`` instead of ``||z||``, as the authors' code does (a zero norm there: 0).

    Args:
        dim: the principal dimension ``neco_dim``; ``None``: the authors' 100 (half the features below 200-d).
        variant: the authors' ``model_architecture_type``: ``resnet`` (CNNs: the ratio alone), ``vit``, ``deit``,
            ``swin``.
    """

    search_space: ClassVar[dict[str, tuple]] = {"dim": (10, 20, 50, 100, 150, 200, 300)}

    def __init__(self, dim: int | None = None, variant: str = "resnet") -> None:
        super().__init__()
        if dim is not None:
            dim = check_count("dim", dim)
        if variant not in VARIANTS:
            raise ConfigError(f"NECO's variant must be one of {', '.join(VARIANTS)}, got {variant!r}.")
        self.dim = dim
        self.variant = variant

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> NECO:
        super().fit_statistics(stats, head)
        feature_dim = stats.feature_dim
        dim = self.dim or default_dim(feature_dim)
        if not 0 < dim <= feature_dim:
            raise ConfigError(f"NECO's dim must be in [1, {feature_dim}] for {feature_dim}-d features, got {dim}.")
        mean, scale = standardiser(stats)
        found = spectrum(stats.total_covariance.cpu() / torch.outer(scale, scale))  # covariance of (h - mean) / scale
        if found.rank < dim < feature_dim:  # all of them: the projection is the identity, whatever the noise
            raise FitError(
                f"its principal subspace of {dim} dimensions is not determined: the standardised features of its "
                f"{stats.num_samples} training images span {found.rank} (the rest is rounding noise); it needs a dim "
                f"of at most {found.rank}, or more training images"
            )
        top = found.vectors[:, :dim]  # (L, dim)
        dtype = self.weight.dtype
        self.mean, self.scale, self.components = mean.to(dtype), scale.to(dtype), top.contiguous().to(dtype)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        h = as_float(features)
        z = (h - self.mean) / self.scale  # (N, L)
        projected = (z @ self.components).norm(dim=1)  # (N,)
        whole = (h if self.variant in ("deit", "swin") else z).norm(dim=1)
        ratio = torch.where(whole > 0, projected / whole, 0.0)  # the authors' 0 / 0 and x / 0: NaN and inf
        return ratio if self.variant == "resnet" else ratio * as_float(logits).amax(dim=1)
