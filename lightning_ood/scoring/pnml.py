"""pNML: the regret of the single-layer predictive normalised maximum likelihood (Bibas, Feder & Hassner, NeurIPS 2021).

For the L2-normalised penultimate feature ``x`` of a test image, ``g = x^T (X^T X)^+ x / (1 + x^T (X^T X)^+ x)``, with
``X`` the normalised training features, measures how far ``x`` lies outside the directions the training set spans;
the genie of each class ``c`` is ``p_c / (p_c + (1 - p_c) p_c^g)``, ``p`` the softmax of the head on ``x`` (the
normalised feature, bias included), and the regret is ``log(sum_c genie_c) / log C``: 0 for a feature the training
set spans, up to 1. As the authors (kobybibas/pnml_ood_detection ``src/lit_utils/baseline_lit_utils.py``: lines 63-74
normalise the features and run the head on them, lines 105-116 fit ``pinv(X^T X)`` with ``rcond = 1e-15`` (line 42)
on the training features, lines 184-202 the regret; line 171 scores ``1 - regret``, higher = ID).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.scoring.base import Scorer, check_positive
from lightning_ood.statistics import FeatureStatistics, Reducers, Statistic, StatisticsBatch, StatisticsSetup


class UnitOuter(Statistic):
    """``unit_outer``: ``X^T X`` of the L2-normalised training features, ``sum_i x_i x_i^T`` (L, L), float64 (a zero
    feature adds nothing)."""

    name = "unit_outer"
    fields = ("unit_outer",)

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        self.outer = torch.zeros(setup.feature_dim, setup.feature_dim, dtype=torch.float64)

    def update(self, batch: StatisticsBatch) -> None:
        x = F.normalize(batch.features.to("cpu", torch.float64), dim=1)  # (B, L)
        self.outer += x.T @ x

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        return {"unit_outer": reduce.sum(self.outer)}


class PNML(Scorer):
    """``1 - regret`` of the pNML learner of the last layer (higher = ID).

    Args:
        rcond: singular values of ``X^T X`` below ``rcond`` times the largest are treated as zero in its
            pseudo-inverse (1e-15, the authors' ``pinv_rcond``).
    """

    needs_statistics = frozenset({UnitOuter})

    def __init__(self, rcond: float = 1e-15) -> None:
        super().__init__()
        check_positive("rcond", rcond)
        self.rcond = rcond

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> PNML:
        super().fit_statistics(stats, head)
        self.projector = torch.linalg.pinv(stats.unit_outer.double(), rtol=self.rcond, hermitian=True)  # (L, L)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        x = F.normalize(features.double(), dim=1)  # (N, L); a zero feature stays zero
        log_p = F.log_softmax(self.head_logits(x), dim=1)  # (N, C): the head on the normalised feature
        projection = ((x @ self.projector.to(x.dtype)) * x).sum(dim=1).abs()  # (N,) x^T (X^T X)^+ x
        g = (projection / (1 + projection))[:, None]
        # genie_c = p / (p + (1 - p) p^g) = 1 / (1 + exp(log(1 - p) + (g - 1) log p)), stable for p -> 0 and p -> 1
        # (a genie of 0 and 1), where the authors' form divides 0 by 0
        genie = torch.sigmoid(-(torch.log(-torch.expm1(log_p)) + (g - 1) * log_p))
        regret = genie.sum(dim=1).log() / math.log(log_p.shape[1])
        return 1 - regret  # float64: a regret below float32 resolution would round 1 - regret to 1.0 (ties)
