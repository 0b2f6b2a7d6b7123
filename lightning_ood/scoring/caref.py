"""CARef and CADRef (Ling et al., CVPR 2025): the relative L1 error between a feature and the mean training feature of
its predicted class; CADRef splits the error by the sign of the predicted class's weights and scales each part by a
logit score.

The class means are those of the training images the network *predicts* as each class (LingAndZero/CADRef
``utils/get_stat.py`` lines 35-38 group the training features by ``output.argmax(1)``), accumulated exactly in the
statistics pass by :class:`PredictedMeans` beside the mean training logit score CADRef divides by.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.scoring.base import Scorer, log_max_softmax
from lightning_ood.scoring.logits import generalized_entropy
from lightning_ood.statistics import (
    FeatureStatistics,
    Reducers,
    Statistic,
    StatisticsBatch,
    StatisticsSetup,
)


class PredictedMeans(Statistic):
    """``predicted_means``: per class the network predicts (argmax of the logits), the count and mean feature of the
    training images predicted as it; and the mean over the training images of each CADRef logit score."""

    name = "predicted_means"
    fields = ("predicted_class_counts", "predicted_class_means", "mean_logit_scores")
    needs_logits = True

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        c, f64 = setup.num_classes, torch.float64
        self.counts = torch.zeros(c, dtype=f64)
        self.sums = torch.zeros(c, setup.feature_dim, dtype=f64)
        self.score_sums = torch.zeros(len(LOGIT_SCORES), dtype=f64)

    def update(self, batch: StatisticsBatch) -> None:
        z = batch.logits.to("cpu", torch.float64)
        predicted = z.argmax(dim=1)
        self.counts += torch.bincount(predicted, minlength=self.setup.num_classes).double()
        self.sums.index_add_(0, predicted, batch.features.to("cpu", torch.float64))
        self.score_sums += torch.stack([score(z).sum() for score in LOGIT_SCORES.values()])

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        counts = reduce.sum(self.counts)
        score_means = reduce.sum(self.score_sums) / core["n"]
        return {
            "predicted_class_counts": counts.round().long(),
            "predicted_class_means": reduce.sum(self.sums) / counts.clamp_min(1)[:, None],
            "mean_logit_scores": dict(zip(LOGIT_SCORES, score_means.unbind(), strict=True)),
        }


def gen_inverse(logits: Tensor, gamma: float = 0.1) -> Tensor:  # (N, C) -> (N,)
    """CADRef's GEN logit score: ``1 / sum over the M largest p_c of p_c^gamma (1 - p_c)^gamma``, M = C // 10 but at
    least 10, no clipping of p (CADRef.py lines 83-89)."""
    return 1 / generalized_entropy(logits, gamma, max(logits.shape[1] // 10, 10))


LOGIT_SCORES = {  # CADRef.py lines 42-50 and 79-95: its --logit_method choices
    "energy": lambda z: torch.logsumexp(z, dim=1),
    "msp": lambda z: log_max_softmax(z).exp().to(z.dtype),
    "maxlogit": lambda z: z.amax(dim=1),
    "gen": gen_inverse,
}


def predicted_class_means(stats: FeatureStatistics) -> Tensor:
    """(C, L) mean training feature per predicted class; a class the network never predicts on the training images
    gets the mean of the images labelled with it (the authors' code has no such case: its mean would be empty)."""
    counts = stats.predicted_class_counts.to(stats.class_means.device)
    return torch.where((counts > 0)[:, None], stats.predicted_class_means.double(), stats.class_means.double())


def relative_l1(features: Tensor) -> Tensor:  # (N, L) -> (N, 1): the denominator of both scores
    return features.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)  # an all-zero feature: a large finite error


class CARef(Scorer):
    """CARef: ``-||h - m_pred||_1 / ||h||_1``, ``m_pred`` the mean training feature of the predicted class
    (CARef.py lines 33-37)."""

    needs_statistics = frozenset({PredictedMeans})

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> CARef:
        super().fit_statistics(stats, head)
        self.means = predicted_class_means(stats).to(self.weight)  # (C, L)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        h = features.double()
        error = (h - self.means[logits.argmax(dim=1)].double()).abs().sum(dim=1, keepdim=True) / relative_l1(h)
        return -error[:, 0]


class CADRef(Scorer):
    """CADRef: ``-(E+ / S(f) + E- / mean_train S)``.

    With ``d = h - m_pred`` and ``s = sign(w_pred)`` (the predicted class's head weights), ``E+ = ||relu(d * s)||_1 /
    ||h||_1`` is the error along the class's weights and ``E- = ||relu(-d * s)||_1 / ||h||_1`` the error against them;
    ``S`` is the logit score, and ``mean_train S`` its mean over the training images (CADRef.py lines 56-75; units
    whose weight is 0 count in neither part).

    Args:
        logit_score: ``energy`` (the authors' default, ``ood_eval.py`` line 30), ``maxlogit``, ``msp`` or ``gen``.
    """

    needs_statistics = frozenset({PredictedMeans})

    def __init__(self, logit_score: str = "energy") -> None:
        super().__init__()
        from lightning_ood.scoring.logits import check_choice

        self.logit_score = check_choice("logit_score", logit_score, tuple(LOGIT_SCORES))

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> CADRef:
        super().fit_statistics(stats, head)
        self.means = predicted_class_means(stats).to(self.weight)  # (C, L)
        self.train_logit_score = stats.mean_logit_scores[self.logit_score].to(self.weight)  # ()
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        h, z = features.double(), logits.double()
        predicted = z.argmax(dim=1)
        aligned = (h - self.means[predicted].double()) * self.weight[predicted].double().sign()  # (N, L)
        norm = relative_l1(h)[:, 0]
        along = F.relu(aligned).sum(dim=1) / norm
        against = F.relu(-aligned).sum(dim=1) / norm
        error = along / LOGIT_SCORES[self.logit_score](z) + against / self.train_logit_score.double()
        return -error


__all__ = ["CADRef", "CARef", "PredictedMeans", "gen_inverse"]
