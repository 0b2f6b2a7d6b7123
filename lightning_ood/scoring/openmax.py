"""OpenMax (Bendale & Boult, CVPR 2016): extreme-value theory on the logit space."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ood.scoring.base import Scorer, check_count, exact_log_softmax
from lightning_ood.statistics import Bank, FeatureStatistics

TRANSLATION = 10_000.0  # libMR shifts the tail by this constant before fitting, as its FitHigh does


class Weibull:
    """libMR's ``FitHigh`` / ``W_score``: a two-parameter Weibull fitted by maximum likelihood to the ``tail`` largest
    values, shifted so that the smallest of them sits at ``TRANSLATION``."""

    def __init__(self, values: np.ndarray, tail: int) -> None:
        from scipy.stats import exponweib

        tail_values = np.sort(values)[-tail:]
        self.shift = TRANSLATION - tail_values.min()
        _, self.shape, _, self.scale = exponweib.fit(tail_values + self.shift, floc=0, f0=1)

    def cdf(self, values: np.ndarray) -> np.ndarray:
        """``1 - exp(-(x / scale)^shape)`` of the shifted values, in log space (no overflow for steep fits)."""
        x = np.maximum(values + self.shift, 1e-300)
        return -np.expm1(-np.exp(np.minimum(self.shape * np.log(x / self.scale), 700.0)))


class OpenMax(Scorer):
    """OpenMax: per class, the mean logit vector (MAV) of its correctly classified training images and a Weibull fit
    to the ``tail`` largest distances of those images to it; at test time the ``alpha`` top classes' logits are
    reduced by ``1 - w_rank * CDF(distance)`` and the removed mass becomes an "unknown" logit; the score is minus the
    softmax probability of "unknown" (OpenOOD's ``openmax``: Euclidean distance, tail 20, alpha 3).

    pytorch-ood centres the MAVs on every training image of a class, the paper (and OpenOOD) on the correctly
    classified ones only, as here.
    """

    needs_statistics = frozenset({Bank})
    search_space: ClassVar[dict[str, tuple]] = {"tail": (10, 20, 50, 100), "alpha": (1, 2, 3, 5, 10)}

    def __init__(self, tail: int = 20, alpha: int = 3) -> None:
        super().__init__()
        self.tail = check_count("tail", tail)
        self.alpha = check_count("alpha", alpha)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> OpenMax:
        super().fit_statistics(stats, head)
        # the Weibull fits are scipy's: on the host, in float64
        logits = self.head_logits(stats.bank.to(self.weight.dtype)).double().cpu()  # (M, C)
        labels = stats.bank_labels.cpu()
        right = logits.argmax(dim=1) == labels
        classes = logits.shape[1]
        self.centres = torch.zeros(classes, classes, dtype=torch.float64)
        self.models: list[Weibull | None] = []
        for c in range(classes):
            members = logits[right & (labels == c)]
            if len(members) < 2:  # too few correct images: this class cannot say "unknown"
                self.models.append(None)
                continue
            self.centres[c] = members.mean(dim=0)
            distances = (members - self.centres[c]).norm(dim=1).numpy()
            self.models.append(Weibull(distances, min(self.tail, len(distances))))
        self.alpha = min(self.alpha, classes)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        z = logits.detach().double().cpu()
        n, classes = z.shape
        distances = torch.cdist(z, self.centres.cpu()).numpy()  # (N, C)
        cdf = np.zeros((n, classes))
        for c, model in enumerate(self.models):
            cdf[:, c] = model.cdf(distances[:, c]) if model is not None else 0.0
        ranks = z.argsort(dim=1, descending=True)[:, : self.alpha].numpy()  # (N, alpha)
        rank_weights = (self.alpha - np.arange(self.alpha)) / self.alpha  # 1, (a-1)/a, ..., 1/a
        weights = np.zeros((n, classes))
        np.put_along_axis(weights, ranks, rank_weights[None, :] * np.take_along_axis(cdf, ranks, 1), axis=1)
        kept = z.numpy() * (1 - weights)
        unknown = (z.numpy() * weights).sum(axis=1, keepdims=True)
        revised = torch.from_numpy(np.concatenate([unknown, kept], axis=1))
        # -log p(unknown) rather than the authors' -p(unknown): the same order, without the ties of a probability
        # that underflows to 0 (float32 below 1e-45) or rounds to 1
        return -exact_log_softmax(revised)[:, 0].to(device=logits.device)
