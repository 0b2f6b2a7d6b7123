"""WeiPer (Granz et al., NeurIPS 2024): the head's class projections perturbed ``repeats`` times at random, and
scores read from the perturbed logits, alone (``weiper``: their mean MSP) or beside the densities of the features and
of the perturbed logits (``weiper_kld``).

A perturbed class projection is ``w_c + delta * ||w_c|| * e``, ``e`` a random unit direction, drawn independently per
class and repeat (mgranz/weiper_icml ``weiper_kldiv/utils.py`` lines 179-200). The directions come from a CPU
generator seeded with ``seed``, so the perturbed head is the same on every run and every DDP process. The authors'
OpenOOD integration draws new directions for every batch (its ``W_tilde`` keyword is not a parameter of
``calculate_WeiPerKLDiv_score``, lines 322-340, so ``perturbed_fc`` stays ``None``); the paper's perturbed head is
one fixed draw, which is what ours is.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.scoring.base import (
    Scorer,
    as_float,
    check_count,
    check_nonnegative,
    check_positive,
    check_seed,
    log_max_softmax,
    log_rest_softmax,
)
from lightning_ood.statistics import Bank, FeatureStatistics

CHUNK_VALUES = 1 << 23  # perturbed logits per block of rows (the ImageNet head has 100 x 1000 per image)
FEATURE_EPS, PERTURBED_EPS = 0.01, 0.025  # added to both densities before the KL (utils.py lines 330-331)
RANGE_EPS = 1e-8  # added to the training maximum, the last bin edge (utils.py line 67)


def perturbed_head(weight: Tensor, bias: Tensor, delta: float, repeats: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(W~, b~)``: ``repeats`` perturbed copies of the head, ``(repeats * C, L)`` and ``(repeats * C,)``, copy-major.

    Each copy's direction is ``randn(C, L)`` (float32, from ``torch.Generator().manual_seed(seed)``, one draw per copy
    in order), each row scaled to norm ``delta * ||w_c||``; the bias is repeated unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    w = weight.detach().double()
    scale = delta * w.norm(dim=1, keepdim=True)  # (C, 1)
    copies = []
    for _ in range(repeats):
        direction = torch.randn(w.shape, generator=generator).to(w)  # (C, L), drawn on the CPU
        copies.append(w + scale * direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.cat(copies).to(weight.dtype), bias.detach().repeat(repeats)


def mean_max_softmax(perturbed: Tensor, repeats: int) -> Tensor:  # (N, repeats * C) -> (N,) float64
    """The MSP of each perturbed copy's logits, averaged over the copies (utils.py lines 426-438), in float64."""
    copies = perturbed.unflatten(1, (repeats, -1)).flatten(0, 1)  # (N * repeats, C)
    return log_max_softmax(copies).exp().unflatten(0, (-1, repeats)).mean(dim=1)


def order_of_mean_max_softmax(perturbed: Tensor, repeats: int) -> Tensor:  # (N, repeats * C) -> (N,) float64
    """``-log(1 - mean MSP)`` over the copies: strictly increasing in the mean MSP, so the same order (and AUROC and
    FPR), computed from each copy's ``log(1 - MSP)`` (:func:`~lightning_ood.scoring.base.log_rest_softmax`), so
    that images whose MSPs all round to 1.0 do not tie."""
    copies = perturbed.unflatten(1, (repeats, -1)).flatten(0, 1)  # (N * repeats, C)
    log_rest = log_rest_softmax(copies).unflatten(0, (-1, repeats))  # (N, repeats)
    return -(torch.logsumexp(log_rest, dim=1) - math.log(repeats))


def bin_edges(low: float, high: float, bins: int) -> Tensor:  # -> (bins + 1,) float64
    """Equal-width edges from the training minimum to the maximum (+ 1e-8), as the authors' ``batch_histogram``."""
    return low + torch.arange(bins + 1, dtype=torch.float64) / bins * (high + RANGE_EPS - low)


def row_densities(x: Tensor, edges: Tensor) -> Tensor:  # (N, D), (B + 1,) -> (N, B) float64
    """Per row, the share of its D values in each bin ``[e_k, e_k+1)``; values outside the training range fall in
    no bin but still count in D (utils.py lines 63-102: the outer bins are dropped, not renormalised)."""
    index = torch.bucketize(x, edges.to(x.dtype), right=True)  # 0: below e_0, B + 1: at or above e_B
    counts = torch.zeros(len(x), len(edges) + 1, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))
    return counts[:, 1:-1] / x.shape[1]


def smooth(density: Tensor, size: int) -> Tensor:  # (N, B) -> (N, B)
    """Moving average of ``size`` bins with the end bins repeated, aligned as ``Conv1d(padding="same",
    padding_mode="replicate")``: ``(size - 1) // 2`` bins before, the rest after (the authors' ``UniformKernel``)."""
    bins = density.shape[1]
    before = (size - 1) // 2
    window = torch.arange(bins, device=density.device)[:, None] + torch.arange(-before, size - before,
                                                                              device=density.device)  # fmt: skip
    return density[:, window.clamp(0, bins - 1)].mean(dim=2)  # (N, B, size) -> (N, B)


def symmetric_kl(train: Tensor, density: Tensor, eps: float) -> Tensor:  # (B,), (N, B) -> (N,)
    """``KL(p || q) + KL(q || p)`` with ``p`` the training density and ``q`` a sample's, each plus ``eps`` and
    normalised (utils.py lines 241-275)."""
    p = train + eps
    p = p / p.sum()
    q = density + eps
    q = q / q.sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


class WeiPer(Scorer):
    """WeiPer+MSP: the mean over ``repeats`` perturbed copies of the head of the maximum softmax probability, scored
    as ``-log(1 - mean MSP)`` (the same order: :func:`order_of_mean_max_softmax`).

    Args:
        delta: the perturbation's length relative to each class projection's (the paper's delta): 1.8 on CIFAR-10,
            2.4 on CIFAR-100 and ImageNet ResNet-50, 2.0 on ImageNet ViT-B/16 (mgranz/weiper_icml ``README.md``,
            the hyperparameters of WeiPer+KLD, which the paper's WeiPer+MSP shares).
        repeats: the number of perturbed copies (the paper's r, 100).
        seed: the seed of the directions (see :func:`perturbed_head`).
    """

    search_space: ClassVar[dict[str, tuple]] = {"delta": (1.8, 2.0, 2.2, 2.4)}

    def __init__(self, delta: float = 1.8, repeats: int = 100, seed: int = 0) -> None:
        super().__init__()
        check_nonnegative("delta", delta)
        check_positive("repeats", repeats)
        check_nonnegative("seed", seed)
        self.delta = delta
        self.repeats = check_count("repeats", repeats)
        self.seed = check_seed("seed", seed)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> WeiPer:
        super().fit_statistics(stats, head)
        self.perturbed_weight, self.perturbed_bias = perturbed_head(
            self.weight, self.bias, self.delta, self.repeats, self.seed
        )
        return self

    def perturbed_logits(self, features: Tensor) -> Tensor:  # (N, L) -> (N, repeats * C)
        h = as_float(features)
        return torch.addmm(self.perturbed_bias.to(h.dtype), h, self.perturbed_weight.T.to(h.dtype))

    def row_blocks(self, features: Tensor):  # rows in blocks that keep the perturbed logits under CHUNK_VALUES
        return features.split(max(1, CHUNK_VALUES // len(self.perturbed_bias)))

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        parts = [order_of_mean_max_softmax(self.perturbed_logits(h), self.repeats) for h in self.row_blocks(features)]
        return torch.cat(parts)


class WeiPerKLD(WeiPer):
    """WeiPer+KLD: ``lambda_2 * MSP_WeiPer - KL_features - lambda_1 * KL_perturbed``.

    ``KL_features`` is the symmetric KL divergence between the histogram of a sample's feature values (its L units
    as samples of one distribution, ``bins`` equal bins between the smallest and largest training activation) after
    a moving average of ``smoothing`` bins, and the mean of the training images' histograms; ``KL_perturbed`` the same
    for its ``repeats * C`` perturbed logits (their own training range, ``smoothing_perturbed``); 0.01 and 0.025 are
    added to the densities (utils.py ``calculate_WeiPerKLDiv_score``, lines 322-463; the postprocessor's ``setup``,
    ``exact_minmax: true``: the ranges are the training set's exact minima and maxima).

    The training ranges and mean histograms are fitted on the statistics' ``bank`` (float16; every training image up
    to ``model.bank_images``, 50,000 by default: all of CIFAR, one image in 26 of ImageNet), as the authors fit them
    on the training images' features; the mean histogram is the mean over the bank's images (the authors average
    per-batch means, the same but for a smaller last batch).

    Args:
        delta, repeats, seed: as :class:`WeiPer`.
        bins: histogram bins (100; 80 for ImageNet ViT-B/16).
        smoothing: moving-average width of the feature histogram, s_1 (4 on CIFAR, 40 on ImageNet).
        smoothing_perturbed: that of the perturbed-logit histogram, s_2 (15 CIFAR-10 and ImageNet, 40 CIFAR-100).
        lambda_1: weight of the perturbed logits' KL (2.5; 0.1 on CIFAR-100).
        lambda_2: weight of WeiPer's MSP (0.1 CIFAR-10 and ViT, 1 CIFAR-100, 0.25 ImageNet ResNet-50).
    """

    needs_statistics = frozenset({Bank})
    # the authors' sweep (weiper_kldiv.yml postprocessor_sweep, searched by hyperparameter_search_on_latents.py)
    search_space: ClassVar[dict[str, tuple]] = {
        "delta": (1.8, 2.0, 2.2, 2.4),
        "bins": (60, 80, 100),
        "lambda_1": (0.1, 1, 2.5, 4),
        "lambda_2": (0.1, 0.25, 1, 2.5, 5),
        "smoothing": (4, 8, 12, 20, 40),
        "smoothing_perturbed": (15, 25, 40),
    }

    def __init__(
        self,
        delta: float = 1.8,
        repeats: int = 100,
        bins: int = 100,
        smoothing: int = 4,
        smoothing_perturbed: int = 15,
        lambda_1: float = 2.5,
        lambda_2: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(delta, repeats, seed)
        check_nonnegative("lambda_1", lambda_1)
        check_nonnegative("lambda_2", lambda_2)
        self.bins = check_count("bins", bins)
        self.smoothing = check_count("smoothing", smoothing)
        self.smoothing_perturbed = check_count("smoothing_perturbed", smoothing_perturbed)
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> WeiPerKLD:
        super().fit_statistics(stats, head)
        bank = stats.bank.to(self.weight.device, self.weight.dtype)  # (M, L)
        blocks = self.row_blocks(bank)
        low, high = float("inf"), float("-inf")
        for h in blocks:  # first pass: the perturbed logits' range
            z = self.perturbed_logits(h)
            low, high = min(low, float(z.min())), max(high, float(z.max()))
        self.feature_edges = bin_edges(float(bank.min()), float(bank.max()), self.bins).to(bank)
        self.perturbed_edges = bin_edges(low, high, self.bins).to(bank)
        feature_sum = sum(row_densities(h, self.feature_edges).sum(dim=0) for h in blocks)
        perturbed_sum = sum(row_densities(self.perturbed_logits(h), self.perturbed_edges).sum(dim=0) for h in blocks)
        self.train_density = (feature_sum / len(bank)).to(bank)  # (bins,)
        self.train_perturbed_density = (perturbed_sum / len(bank)).to(bank)  # (bins,)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        parts = []
        for h in self.row_blocks(as_float(features)):
            z = self.perturbed_logits(h)
            feature_q = smooth(row_densities(h, self.feature_edges), self.smoothing)
            perturbed_q = smooth(row_densities(z, self.perturbed_edges), self.smoothing_perturbed)
            kl = symmetric_kl(self.train_density.double(), feature_q, FEATURE_EPS)
            kl_perturbed = symmetric_kl(self.train_perturbed_density.double(), perturbed_q, PERTURBED_EPS)
            msp = mean_max_softmax(z, self.repeats).double()
            parts.append(self.lambda_2 * msp - kl - self.lambda_1 * kl_perturbed)
        return torch.cat(parts)


__all__ = ["WeiPer", "WeiPerKLD", "perturbed_head"]
