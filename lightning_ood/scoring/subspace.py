"""ViM and Residual (Wang et al., CVPR 2022): the part of a feature outside the principal subspace of the training
features, measured from the head's origin ``u = -pinv(W) b``.

The principal subspace comes from the training features' second moment around ``u``, which the statistics hold
exactly (``E[(h - u)(h - u)^T] = E[h h^T] - u E[h]^T - E[h] u^T + u u^T``); ViM's scale ``alpha`` averages over the
training images in the bank, as the authors and OpenOOD do over the training set.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring.base import Scorer, as_float, check_positive, energy
from lightning_ood.statistics import FeatureStatistics


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
    mean = stats.mean.double().cpu()
    moment = stats.second_moment.cpu() - torch.outer(u, mean) - torch.outer(mean, u) + torch.outer(u, u)
    values, vectors = torch.linalg.eigh(moment)  # ascending
    order = values.argsort(descending=True)
    return u, vectors[:, order[dim:]].contiguous()


class ViM(Scorer):
    """Virtual-logit matching: ``energy(f) - alpha * ||(h - u) NS||`` with ``alpha`` = mean training max logit / mean
    training residual norm.

    Args:
        dim: principal dimension D; ``None`` picks the authors' value for the feature size (see ``default_dim``).
    """

    needs_statistics = frozenset({"bank"})
    search_space: ClassVar[dict[str, tuple]] = {"dim": (64, 128, 256, 512, 1000)}

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None:
            check_positive("dim", dim)
        self.dim = dim

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> ViM:
        super().fit_statistics(stats, head)
        dim = self.dim or default_dim(head.in_features)
        u, ns = residual_space(stats, head, dim)
        self.origin, self.null_space = u.to(self.weight.dtype), ns.to(self.weight.dtype)
        bank = stats.bank.double().cpu()
        residual = ((bank - u) @ ns).norm(dim=1)
        max_logit = (bank @ head.weight.detach().double().T.cpu() + head.bias.detach().double().cpu()).amax(dim=1)
        self.alpha = float(max_logit.mean() / residual.mean())
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        residual = ((as_float(features) - self.origin) @ self.null_space).norm(dim=1)
        return energy(as_float(logits)) - self.alpha * residual


class Residual(Scorer):
    """Residual: minus the norm of the feature outside the principal subspace, ``-||(h - u) NS||`` (ViM without the
    logits). OpenOOD fits it on its ID validation split; here, as the paper, on the training features."""

    search_space: ClassVar[dict[str, tuple]] = {"dim": (64, 128, 256, 512, 1000)}

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None:
            check_positive("dim", dim)
        self.dim = dim

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Residual:
        super().fit_statistics(stats, head)
        u, ns = residual_space(stats, head, self.dim or default_dim(head.in_features))
        self.origin, self.null_space = u.to(self.weight.dtype), ns.to(self.weight.dtype)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return -((as_float(features) - self.origin) @ self.null_space).norm(dim=1)
