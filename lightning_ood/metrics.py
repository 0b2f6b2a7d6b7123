"""OOD detection metrics with ID as the positive class: FPR at 95% TPR (the paper's definition), AUROC, AUPR-In and
AUPR-Out, as functions and as torchmetrics ``Metric`` objects that synchronise across processes.

Conventions: ``scores`` higher = more in-distribution; ``is_id`` is 1 (or True) for ID samples, 0 for OOD samples.

FPR@95%TPR: the threshold ``t`` is the largest score such that at least 95% of the ID scores are ``>= t`` (the first
point of sklearn's ``roc_curve(is_id, scores, drop_intermediate=False)`` with TPR >= 0.95); FPR is the share of OOD
scores ``>= t``. OpenOOD and pytorch-ood report a different number (OOD as positive); ours is the paper's.

``threshold="closest"`` is the rule of the paper's code (HIMPLoS ``utils/test_utils.py``, ``fpr_and_fdr_at_recall``,
Hendrycks et al.'s function): among the distinct scores down to the one that keeps every ID score, the one whose TPR is
nearest to 95% (``argmin |TPR - 0.95|`` in float64), on a tie of distances the lowest of them, so also the lowest score
of a run of thresholds that share one TPR. Its TPR may fall below 95%, and its threshold, which sits just above the next
lower ID score, also counts the OOD scores between those two ID scores. On continuous scores the two rules differ by
those OOD scores (about 0.2 percentage points of FPR at 1,000 ID scores, 0.01 to 0.04 at 10,000, against 10,000 OOD
ones, two unit normals one apart), plus one ID step where ``0.95 * n_id`` is not an integer; under heavy ties by much
more (400 ID and 400 OOD scores of those normals rounded to integers: 0.22 lower under ``closest`` on average, up to
0.28), in general by any amount (90% of the ID scores at one value, 10% at a lower one shared by every OOD score: FPR 1
under ``first_at_tpr``, 0 under ``closest``, whose TPR is then 90%).

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


FPR_THRESHOLDS = ("first_at_tpr", "closest")


def check_fpr_threshold(threshold: str) -> str:
    if threshold not in FPR_THRESHOLDS:
        raise ValueError(f"threshold must be one of {', '.join(FPR_THRESHOLDS)}, got {threshold!r}")
    return threshold


def fpr_at_tpr(scores: Tensor, is_id: Tensor, tpr: float = 0.95, threshold: str = "first_at_tpr") -> Tensor:
    """Share of OOD scores at or above the threshold that keeps ``tpr`` of the ID scores (ID positive).

    ``threshold``: ``first_at_tpr`` (the largest score keeping at least ``tpr`` of the ID scores) or ``closest`` (the
    paper's code: the score whose TPR is nearest to ``tpr``; see the module docstring)."""
    check_fpr_threshold(threshold)
    id_scores, ood_scores = _split(scores, is_id)
    if threshold == "closest":
        return _fpr_at_closest_tpr(scores.flatten().double(), is_id.flatten().bool(), tpr)
    cut = tpr_threshold(id_scores, tpr)
    return (ood_scores.double() >= cut).double().mean()


def _fpr_at_closest_tpr(scores: Tensor, is_id: Tensor, tpr: float) -> Tensor:
    """FPR at the distinct score whose TPR is nearest to ``tpr``, the lowest such score on ties."""
    order = scores.argsort(descending=True)
    scores, is_id = scores[order], is_id[order]
    last_of_value = torch.ones_like(is_id)
    last_of_value[:-1] = scores[1:] != scores[:-1]  # the last position of each run of equal scores
    tps = is_id.double().cumsum(0)[last_of_value]  # (V,) ID scores >= each distinct score, high to low
    fps = (~is_id).double().cumsum(0)[last_of_value]
    n_id = tps[-1]
    keep = int((tps < n_id).sum()) + 1  # down to the first score that keeps every ID score
    distance = (tps[:keep] / n_id - tpr).abs()
    cut = int((distance == distance.min()).nonzero()[-1])  # the lowest of the nearest
    return fps[cut] / (~is_id).sum()


class FPRAtTPR(Metric):
    """FPR at a fixed TPR (default 95%) with ID as the positive class (see :func:`fpr_at_tpr`), or, with
    ``positive="ood"``, OpenOOD v1.5's definition: the share of ID images flagged as OOD at the threshold that catches
    ``tpr`` of the OOD images (lower scores = OOD). A different number; labelled as such in every report.
    ``threshold``: ``first_at_tpr`` (ours) or ``closest`` (the paper's code), see :func:`fpr_at_tpr`."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    scores: list[Tensor]
    is_id: list[Tensor]

    def __init__(self, tpr: float = 0.95, positive: str = "id", threshold: str = "first_at_tpr", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        if positive not in ("id", "ood"):
            raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")
        self.tpr = tpr
        self.positive = positive
        self.threshold = check_fpr_threshold(threshold)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_id", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_id: Tensor) -> None:
        self.scores.append(scores.detach().flatten().double())
        self.is_id.append(is_id.detach().flatten().bool())

    def compute(self) -> Tensor:
        scores, is_id = dim_zero_cat(self.scores), dim_zero_cat(self.is_id)
        if self.positive == "ood":
            return fpr_at_tpr(-scores, ~is_id, self.tpr, self.threshold)
        return fpr_at_tpr(scores, is_id, self.tpr, self.threshold)


class AUPROut(BinaryAveragePrecision):
    """Average precision with OOD as the positive class (scores negated)."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(-preds, 1 - target)


class OODMetrics(MetricCollection):
    """FPR95, AUROC, AUPR-In and AUPR-Out of one (scorer, OOD set) pair; update with ``(scores, is_id)``.

    Scores are kept in float64 so that the results match sklearn on the same scores to ~1e-12.
    """

    def __init__(self, tpr: float = 0.95, positive: str = "id", threshold: str = "first_at_tpr") -> None:
        super().__init__(
            {
                "fpr95": FPRAtTPR(tpr, positive, threshold),
                # inputs are formatted by ``update`` below: skip torchmetrics' per-batch validation
                "auroc": BinaryAUROC(normalization=None, validate_args=False),
                "aupr_in": BinaryAveragePrecision(normalization=None, validate_args=False),
                "aupr_out": AUPROut(normalization=None, validate_args=False),
            },
            compute_groups=False,
        )

    def update(self, scores: Tensor, is_id: Tensor) -> None:  # type: ignore[override]
        super().update(scores.detach().double(), is_id.long())


def ood_metrics(
    id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95, positive: str = "id", threshold: str = "first_at_tpr"
) -> dict[str, float]:
    """FPR95, AUROC, AUPR-In and AUPR-Out of one ID/OOD score pair, as floats (the functional :class:`OODMetrics`)."""
    metrics = OODMetrics(tpr, positive, threshold)
    scores = torch.cat([id_scores.flatten(), ood_scores.flatten()])
    is_id = torch.cat([torch.ones(id_scores.numel()), torch.zeros(ood_scores.numel())])
    metrics.update(scores, is_id)
    return {name: float(value) for name, value in metrics.compute().items()}
