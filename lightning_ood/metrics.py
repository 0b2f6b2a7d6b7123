"""OOD detection metrics with ID as the positive class: FPR at 95% TPR (the paper's definition), AUROC, AUPR-In and
AUPR-Out, as functions and as torchmetrics ``Metric`` objects that synchronise across processes.

Conventions: ``scores`` higher = more in-distribution; ``is_id`` is 1 (or True) for ID samples, 0 for OOD samples.

FPR@95%TPR: the threshold ``t`` is the largest score such that at least 95% of the ID scores are ``>= t`` (the first
point of sklearn's ``roc_curve(is_id, scores, drop_intermediate=False)`` with TPR >= 0.95); FPR is the share of OOD
scores ``>= t``. OpenOOD and pytorch-ood report a different number (OOD as positive); ours is the paper's.

AUROC and AUPR use torchmetrics with ``normalization=None``: torchmetrics otherwise passes scores outside [0, 1]
through a sigmoid, per batch, which saturates energy-like scores into ties and silently changes the result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision
from torchmetrics.utilities import dim_zero_cat


def _split(scores: Tensor, is_id: Tensor) -> tuple[Tensor, Tensor]:
    scores, is_id = scores.flatten(), is_id.flatten().bool()
    if scores.shape != is_id.shape:
        raise ValueError(f"scores and is_id differ in size: {scores.numel()} vs {is_id.numel()}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{int((~torch.isfinite(scores)).sum())} scores are NaN or infinite")
    id_scores, ood_scores = scores[is_id], scores[~is_id]
    if id_scores.numel() == 0 or ood_scores.numel() == 0:
        raise ValueError(f"need both ID and OOD scores, got {id_scores.numel()} ID and {ood_scores.numel()} OOD")
    return id_scores, ood_scores


def tpr_threshold(id_scores: Tensor, tpr: float = 0.95) -> Tensor:
    """Largest ``t`` with ``mean(id_scores >= t) >= tpr``: the k-th largest ID score, k the smallest count with
    ``k / n >= tpr`` evaluated in floating point exactly as sklearn compares TPRs."""
    n = id_scores.numel()
    k = max(1, min(n, int(tpr * n)))
    while k > 1 and (k - 1) / n >= tpr:
        k -= 1
    while k < n and k / n < tpr:
        k += 1
    return id_scores.double().topk(k).values[-1]


def fpr_at_tpr(scores: Tensor, is_id: Tensor, tpr: float = 0.95) -> Tensor:
    """Share of OOD scores at or above the threshold that keeps ``tpr`` of the ID scores (ID positive)."""
    id_scores, ood_scores = _split(scores, is_id)
    threshold = tpr_threshold(id_scores, tpr)
    return (ood_scores.double() >= threshold).double().mean()


class FPRAtTPR(Metric):
    """FPR at a fixed TPR (default 95%) with ID as the positive class (see :func:`fpr_at_tpr`), or, with
    ``positive="ood"``, OpenOOD v1.5's definition: the share of ID images flagged as OOD at the threshold that catches
    ``tpr`` of the OOD images (lower scores = OOD). A different number; labelled as such in every report."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    scores: list[Tensor]
    is_id: list[Tensor]

    def __init__(self, tpr: float = 0.95, positive: str = "id", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        if positive not in ("id", "ood"):
            raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")
        self.tpr = tpr
        self.positive = positive
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_id", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_id: Tensor) -> None:
        self.scores.append(scores.detach().flatten().double())
        self.is_id.append(is_id.detach().flatten().bool())

    def compute(self) -> Tensor:
        scores, is_id = dim_zero_cat(self.scores), dim_zero_cat(self.is_id)
        if self.positive == "ood":
            return fpr_at_tpr(-scores, ~is_id, self.tpr)
        return fpr_at_tpr(scores, is_id, self.tpr)


class AUPROut(BinaryAveragePrecision):
    """Average precision with OOD as the positive class (scores negated)."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(-preds, 1 - target)


class OODMetrics(MetricCollection):
    """FPR95, AUROC, AUPR-In and AUPR-Out of one (scorer, OOD set) pair; update with ``(scores, is_id)``.

    Scores are kept in float64 so that the results match sklearn on the same scores to ~1e-12.
    """

    def __init__(self, tpr: float = 0.95, positive: str = "id") -> None:
        super().__init__(
            {
                "fpr95": FPRAtTPR(tpr, positive),
                # inputs are formatted by ``update`` below: skip torchmetrics' per-batch validation
                "auroc": BinaryAUROC(normalization=None, validate_args=False),
                "aupr_in": BinaryAveragePrecision(normalization=None, validate_args=False),
                "aupr_out": AUPROut(normalization=None, validate_args=False),
            },
            compute_groups=False,
        )

    def update(self, scores: Tensor, is_id: Tensor) -> None:  # type: ignore[override]
        super().update(scores.detach().double(), is_id.long())


def ood_metrics(id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95, positive: str = "id") -> dict[str, float]:
    """FPR95, AUROC, AUPR-In and AUPR-Out of one ID/OOD score pair, as floats (the functional :class:`OODMetrics`)."""
    metrics = OODMetrics(tpr, positive)
    scores = torch.cat([id_scores.flatten(), ood_scores.flatten()])
    is_id = torch.cat([torch.ones(id_scores.numel()), torch.zeros(ood_scores.numel())])
    metrics.update(scores, is_id)
    return {name: float(value) for name, value in metrics.compute().items()}
