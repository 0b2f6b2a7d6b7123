"""ViM and Residual (Wang et al., CVPR 2022): the part of a feature outside the principal subspace of the training
features, measured from the head's origin ``u = -pinv(W) b``.

The principal subspace comes from the training features' second moment around ``u``, which the statistics hold
exactly (``E[(h - u)(h - u)^T] = Cov(h) + (E[h] - u)(E[h] - u)^T``); ViM's scale ``alpha`` averages over the
training images in the bank, as the authors and OpenOOD do over the training set. A subspace of more dimensions than
the training features span (fewer images than ``dim``) would be completed by rounding noise: it is refused.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError, FitError
from lightning_ood.linalg import spectrum
from lightning_ood.scoring.base import Scorer, as_float, check_count, energy
from lightning_ood.statistics import Bank, FeatureStatistics


def default_dim(feature_dim: int) -> int:
    """The authors' principal dimension D (haoqiwang/vim ``benchmark.py``): 1000 for features of 2048 or more
    (ResNet-50), 512 for 768 to 2047 (ViT's 768, MobileNetV2's 1280), half the features below 768 (256 for CIFAR's
    512-d ResNet-18, as OpenOOD; 171 for DenseNet-BC's 342)."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def residual_space(stats: FeatureStatistics, head: nn.Linear, dim: int) -> tuple[Tensor, Tensor]:
    """``(u, NS)``: the origin (L,) and the (L, L - dim) basis orthogonal to the top-``dim`` principal directions."""
    weight, bias = head.weight.detach().double().cpu(), head.bias.detach().double().cpu()
    feature_dim = weight.shape[1]
    if not 0 < dim < feature_dim:
        raise ConfigError(
            f"ViM's principal dimension must be in [1, {feature_dim - 1}] for {feature_dim}-d features, got {dim}."
        )
    u = -torch.linalg.pinv(weight) @ bias  # (L,)
    found = spectrum(stats.moment_around(u).cpu())
    if found.rank < dim:
        raise FitError(
            f"its principal subspace of {dim} dimensions is not determined: the {stats.num_samples} training images "
            f"span {found.rank} dimension{'s' * (found.rank != 1)} around the head's origin (the rest is rounding "
            f"noise); it needs a dim of at most {found.rank}, or more training images"
        )
    return u, found.vectors[:, dim:].contiguous()


def residual_norm(features: Tensor, null_space: Tensor, origin_residual: Tensor) -> Tensor:  # (N, L) -> (N,) float64
    """``||(h - u) NS||`` as ``||h NS - u NS||`` in float64: the origin ``u`` can be far larger than the features, and
    in float32 the difference of two large projections keeps only the rounding of the features' part."""
    return (features.double() @ null_space.double() - origin_residual.double()).norm(dim=1)


class Residual(Scorer):
    """Residual: minus the norm of the feature outside the principal subspace, ``-||(h - u) NS||`` (ViM without the
    logits). OpenOOD fits it on its ID validation split; here, as the paper, on the training features."""

    search_space: ClassVar[dict[str, tuple]] = {"dim": (64, 128, 256, 512, 1000)}

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = None if dim is None else check_count("dim", dim)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Residual:
        super().fit_statistics(stats, head)
        u, ns = residual_space(stats, head, self.dim or default_dim(head.in_features))
        self.null_space, self.origin_residual = ns, u @ ns  # float64: see residual_norm
        self.fit_scale(stats, head, u, ns)
        return self

    def fit_scale(self, stats: FeatureStatistics, head: nn.Linear, origin: Tensor, null_space: Tensor) -> None:
        """What a subclass fits on the principal subspace (ViM's ``alpha``); nothing here."""

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return -residual_norm(features, self.null_space, self.origin_residual)


class ViM(Residual):
    """Virtual-logit matching: ``energy(f) - alpha * ||(h - u) NS||`` with ``alpha`` = mean training max logit / mean
    training residual norm (:class:`Residual` plus the energy, on the same principal subspace).

    Args:
        dim: principal dimension D; ``None`` picks the authors' value for the feature size (see ``default_dim``).
    """

    needs_statistics = frozenset({Bank})

    def fit_scale(self, stats: FeatureStatistics, head: nn.Linear, origin: Tensor, null_space: Tensor) -> None:
        bank = stats.bank.double().cpu()
        residual = ((bank - origin) @ null_space).norm(dim=1)
        max_logit = (bank @ head.weight.detach().double().T.cpu() + head.bias.detach().double().cpu()).amax(dim=1)
        self.alpha = float(max_logit.mean() / residual.mean())

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        residual = residual_norm(features, self.null_space, self.origin_residual)
        return energy(as_float(logits)).double() - self.alpha * residual
