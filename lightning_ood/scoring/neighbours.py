"""Scores from the training images' features themselves (the statistics' ``bank``): KNN, NNGuide and Relation.

The bank holds the features of the training images (all of them by default, or one in ``bank_stride`` for large
sets), float16; every search is exact, in chunks of the bank, so no (N, M) matrix for a whole test set is built.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError, FitError
from lightning_ood.scoring.base import Scorer, as_float, check_count, check_nonnegative, check_positive, energy
from lightning_ood.statistics import (
    Bank,
    FeatureStatistics,
)

CHUNK = 8192  # bank rows per matrix product


def unit(x: Tensor, eps: float = 1e-10) -> Tensor:  # (N, L) -> rows of norm 1 (0 stays 0)
    return x / (x.norm(dim=1, keepdim=True) + eps)


def kth_smallest_squared_distance(queries: Tensor, bank: Tensor, k: int, chunk: int = CHUNK) -> Tensor:
    """``(N,)`` squared Euclidean distance of each query to its ``k``-th nearest bank row, exactly, in chunks."""
    q_sq = (queries * queries).sum(dim=1, keepdim=True)  # (N, 1)
    best = None
    for start in range(0, len(bank), chunk):
        rows = bank[start : start + chunk]  # (m, L)
        d2 = q_sq + (rows * rows).sum(dim=1)[None, :] - 2 * queries @ rows.T  # (N, m)
        candidates = d2 if best is None else torch.cat([best, d2], dim=1)
        best = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=False).values
    return best[:, -1].clamp_min(0)


def check_neighbours(k: int, available: int, where: str) -> None:
    """Refuse ``k`` neighbours among fewer training features (a search would silently take them all)."""
    if k > available:
        raise FitError(
            f"k = {k} nearest neighbours need at least {k} training features in {where}, which holds {available}: "
            f"lower k, or keep more training images in the bank (model.bank_images)"
        )


class KNN(Scorer):
    """Deep nearest neighbours (Sun et al., ICML 2022): minus the Euclidean distance from the L2-normalised feature to
    its k-th nearest L2-normalised training feature.

    The authors (and OpenOOD) rank by the squared distance from faiss; the order, and every metric, are the same.
    ``k = 50`` on CIFAR; on ImageNet ``k = 1000`` with 1% of the training images in the bank
    (``model.bank_images: 12811``).
    """

    needs_statistics = frozenset({Bank})
    search_space: ClassVar[dict[str, tuple]] = {"k": (1, 10, 20, 50, 100, 200, 500, 1000)}

    def __init__(self, k: int = 50) -> None:
        super().__init__()
        self.k = check_count("k", k)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> KNN:
        super().fit_statistics(stats, head)
        self.bank = unit(stats.bank.to(self.weight.dtype))  # (M, L)
        check_neighbours(self.k, len(self.bank), "the bank")
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return -kth_smallest_squared_distance(unit(as_float(features)), self.bank, self.k).sqrt()


class NNGuide(Scorer):
    """Nearest-neighbour guidance (Park et al., ICCV 2023): the mean of the ``k`` largest inner products between the
    normalised feature and the guided bank ``unit(h_i) * energy(f(h_i))``, times the sample's own energy.

    The bank is a fraction of the training images (``fraction``: 1%, the authors' ImageNet setting and OpenOOD's
    default), taken evenly by dataset index from the statistics' bank.
    """

    needs_statistics = frozenset({Bank})
    search_space: ClassVar[dict[str, tuple]] = {"k": (1, 10, 50, 100, 200), "fraction": (0.01, 0.05, 0.1, 1.0)}

    def __init__(self, k: int = 100, fraction: float = 0.01) -> None:
        super().__init__()
        check_positive("fraction", fraction)
        if fraction > 1:
            raise ConfigError(f"fraction (of the bank) must be in (0, 1], got {fraction}.")
        self.k = check_count("k", k)
        self.fraction = fraction

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> NNGuide:
        super().fit_statistics(stats, head)
        step = max(1, round(1 / self.fraction))
        bank = stats.bank[::step].to(self.weight.dtype)
        self.guided = unit(bank) * energy(self.head_logits(bank))[:, None]  # (M', L)
        check_neighbours(self.k, len(bank), f"the guided bank ({self.fraction:g} of the bank's {len(stats.bank)})")
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        queries = unit(as_float(features))
        best = None
        for start in range(0, len(self.guided), CHUNK):
            sims = queries @ self.guided[start : start + CHUNK].T
            candidates = sims if best is None else torch.cat([best, sims], dim=1)
            best = candidates.topk(min(self.k, candidates.shape[1]), dim=1).values
        return best.mean(dim=1) * energy(as_float(logits))


class Relation(Scorer):
    """Relation (Kim et al., NeurIPS 2023): the sum over training images of the relational kernel
    ``r = max(cos(h, h_i), 0) * <p, p_i>`` raised to ``power``, counting only ``r > threshold`` (0.03), as OpenOOD.
    """

    needs_statistics = frozenset({Bank})
    search_space: ClassVar[dict[str, tuple]] = {"power": (1, 2, 4, 6, 8)}

    def __init__(self, power: float = 1.0, threshold: float = 0.03) -> None:
        super().__init__()
        check_positive("power", power)
        check_nonnegative("threshold", threshold)
        self.power = power
        self.threshold = threshold

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Relation:
        super().fit_statistics(stats, head)
        bank = stats.bank.to(self.weight.dtype)
        self.bank_units = bank / (bank.pow(2).sum(dim=1, keepdim=True) + 1e-10).sqrt()
        self.bank_probs = self.head_logits(bank).softmax(dim=1)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        h = as_float(features)
        h = h / (h.pow(2).sum(dim=1, keepdim=True) + 1e-10).sqrt()
        p = as_float(logits).softmax(dim=1)
        total = torch.zeros(len(h), dtype=torch.float64, device=h.device)
        for start in range(0, len(self.bank_units), CHUNK):
            r = (h @ self.bank_units[start : start + CHUNK].T).clamp_min(0)
            r = r * (p @ self.bank_probs[start : start + CHUNK].T)  # (N, m)
            total += torch.where(r > self.threshold, r.double() ** self.power, 0.0).sum(dim=1)
        return total
