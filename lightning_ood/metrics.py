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

AUROC and AUPR are computed here from the sorted scores (:func:`auroc`, :func:`average_precision`: sklearn's
definitions, ties counting as sklearn counts them), in float64, from every score: torchmetrics' ``BinaryAUROC``
passes scores outside [0, 1] through a sigmoid by default, per batch, which saturates energy-like scores into ties,
and its curves accumulate in float32, in an order that changes with the batching and the number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
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


def _split_checked(scores: Tensor, is_id: Tensor) -> tuple[Tensor, Tensor]:
    """``(scores, is_id)`` flattened, once :func:`_split` has checked them (finite, both classes present)."""
    _split(scores, is_id)
    return scores.flatten(), is_id.flatten().bool()


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


class Concatenated(Metric):
    """Every value passed to ``update`` (flattened, in its own dtype: no cast, unlike torchmetrics' ``CatMetric``,
    which rounds float64 scores to float32), concatenated over the batches and, synchronised, over every process in
    rank order. :func:`dataset_order` puts the values of a test set back in dataset order. (torchmetrics squeezes a
    result of one value to a 0-d tensor: ``compute().reshape(-1)`` restores the 1-d one.)"""

    is_differentiable = False
    full_state_update = False
    values: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Tensor) -> None:
        self.values.append(values.detach().flatten())

    def compute(self) -> Tensor:
        if isinstance(self.values, list) and not self.values:  # nothing seen (a synchronised state is a tensor)
            return torch.empty(0)
        return dim_zero_cat(self.values)


def dataset_order(indices: Tensor, name: str = "the test set") -> Tensor:
    """The permutation that sorts the gathered values of a test set by their dataset ``indices``; refuses indices
    seen twice or missing (an image scored twice, or lost, by a sampler under DDP)."""
    indices = indices.reshape(-1)  # one image: torchmetrics' compute squeezed it to 0-d
    order = indices.argsort()
    ordered = indices[order]
    expected = torch.arange(len(indices), device=indices.device, dtype=ordered.dtype)
    if not torch.equal(ordered, expected):
        repeated = int(len(ordered) - ordered.unique().numel())
        raise ValueError(
            f"{name}: the {len(indices)} scored images are not each image once ({repeated} scored twice); every "
            f"metric would count them so. The evaluation loaders must not pad or repeat images."
        )
    return order


def threshold_counts(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """``(tp, fp)``: at each distinct score, from the highest down, the positives and negatives at or above it
    (float64 counts, exact). They depend only on the multiset of (score, label) pairs, not on their order."""
    order = scores.argsort(descending=True)
    scores, positive = scores[order], positive[order]
    last = torch.ones_like(positive)
    last[:-1] = scores[1:] != scores[:-1]  # the last position of each run of equal scores
    return positive.double().cumsum(0)[last], (~positive).double().cumsum(0)[last]


def auroc(scores: Tensor, positive: Tensor) -> Tensor:
    """Area under the ROC curve, ties counting one half (sklearn's ``roc_auc_score``): the trapezoids between the
    distinct thresholds, whose summed doubled areas are integers, exact in float64 below 2^53, so the result does not
    depend on the order or the batching of the scores."""
    tp, fp = threshold_counts(scores, positive)
    zero = tp.new_zeros(1)
    tp_before, fp_before = torch.cat([zero, tp[:-1]]), torch.cat([zero, fp[:-1]])
    doubled = ((fp - fp_before) * (tp + tp_before)).sum()
    return doubled / (2 * tp[-1] * fp[-1])


def average_precision(scores: Tensor, positive: Tensor) -> Tensor:
    """Average precision, ``sum_k (R_k - R_k-1) P_k`` over the distinct thresholds from the highest down (sklearn's
    ``average_precision_score``), in float64, summed in that fixed order."""
    tp, fp = threshold_counts(scores, positive)
    gained = tp - torch.cat([tp.new_zeros(1), tp[:-1]])
    return (gained * (tp / (tp + fp))).sum() / tp[-1]


class OODMetrics(FPRAtTPR):
    """FPR95, AUROC, AUPR-In and AUPR-Out of one (scorer, OOD set) pair; update with ``(scores, is_id)``.

    Every score is kept (float64, gathered across processes in rank order) and the four metrics are computed from
    the scores sorted (:func:`fpr_at_tpr`, :func:`auroc`, :func:`average_precision`): a result depends only on the
    multiset of scores, so the metrics of several processes are bit for bit those of one process on the union of
    their scores, whatever the batching. AUPR-Out takes OOD as the positive class (scores negated). The FPR's
    settings are :class:`FPRAtTPR`'s.
    """

    higher_is_better = None  # FPR lower, the others higher

    def compute(self) -> dict[str, Tensor]:
        scores, is_id = _split_checked(dim_zero_cat(self.scores), dim_zero_cat(self.is_id))
        return {
            "fpr95": super().compute(),
            "auroc": auroc(scores, is_id),
            "aupr_in": average_precision(scores, is_id),
            "aupr_out": average_precision(-scores, ~is_id),
        }


def ood_metrics(
    id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95, positive: str = "id", threshold: str = "first_at_tpr"
) -> dict[str, float]:
    """FPR95, AUROC, AUPR-In and AUPR-Out of one ID/OOD score pair, as floats (the functional :class:`OODMetrics`)."""
    metrics = OODMetrics(tpr, positive, threshold)
    scores = torch.cat([id_scores.flatten(), ood_scores.flatten()])
    is_id = torch.cat([torch.ones(id_scores.numel()), torch.zeros(ood_scores.numel())])
    metrics.update(scores, is_id)
    return {name: float(value) for name, value in metrics.compute().items()}
