"""FPR95 as the paper's code computes it (HIMPLoS ``utils/test_utils.py``, ``fpr_and_fdr_at_recall`` called by
``get_measures`` with ID labelled 1 and ``recall_level = 0.95``): the threshold whose TPR is nearest to 95%,
``model.fpr_threshold: closest``, against ours (``first_at_tpr``, the first threshold with TPR >= 95%).

The reference is numpy, written from their function; the tests show how far the two rules lie apart."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ood.errors import ConfigError
from lightning_ood.metrics import FPRAtTPR, OODMetrics, fpr_at_tpr, ood_metrics
from lightning_ood.report import OODReport

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


def paper_fpr(is_id: np.ndarray, scores: np.ndarray, recall_level: float = 0.95) -> float:
    """``fpr_and_fdr_at_recall``: distinct scores high to low, cut where every ID score is kept, reversed (low to
    high), then the first ``argmin |recall - recall_level|``; FPR = OOD scores >= that threshold / OOD scores."""
    positive = is_id == 1
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positive = scores[order], positive[order]
    threshold_idxs = np.r_[np.where(np.diff(scores))[0], positive.size - 1]
    tps = np.cumsum(positive, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    reverse = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[reverse], 1], np.r_[fps[reverse], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return float(fps[cutoff] / np.sum(~positive))


def first_at_tpr_fpr(is_id: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """Ours, independently: the largest score keeping at least ``tpr`` of the ID scores."""
    id_scores = np.sort(scores[is_id == 1])[::-1]
    kept = np.arange(1, id_scores.size + 1) / id_scores.size
    threshold = id_scores[np.argmax(kept >= tpr)]
    return float(np.mean(scores[is_id == 0] >= threshold))


def case(seed: int, n_id: int, n_ood: int, decimals: int | None):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)]
    if decimals is not None:
        scores = np.round(scores, decimals)
    return np.r_[np.ones(n_id, dtype=np.int64), np.zeros(n_ood, dtype=np.int64)], scores


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_closest_equals_the_papers_code(decimals):
    for seed in range(60):
        rng = np.random.default_rng(1000 + seed)
        is_id, scores = case(seed, int(rng.integers(3, 800)), int(rng.integers(3, 800)), decimals)
        ours = fpr_at_tpr(torch.from_numpy(scores), torch.from_numpy(is_id), threshold="closest").item()
        assert ours == paper_fpr(is_id, scores), seed  # exactly: the same counts, the same float64 comparisons
        assert fpr_at_tpr(torch.from_numpy(scores), torch.from_numpy(is_id)).item() == pytest.approx(
            first_at_tpr_fpr(is_id, scores), abs=1e-15
        )
    # the Metric over batches in any order, and the OOD-positive variant (the same rule on negated scores)
    is_id, scores = case(7, 500, 300, 1)
    metric = FPRAtTPR(threshold="closest")
    for chunk in np.array_split(np.random.default_rng(0).permutation(800), 7):
        metric.update(torch.from_numpy(scores[chunk]), torch.from_numpy(is_id[chunk]))
    assert metric.compute().item() == paper_fpr(is_id, scores)
    flipped = ood_metrics(torch.from_numpy(scores[is_id == 1]), torch.from_numpy(scores[is_id == 0]),
                          positive="ood", threshold="closest")  # fmt: skip
    assert flipped["fpr95"] == paper_fpr(1 - is_id, -scores)


def test_how_far_the_two_rules_differ():
    # heavy ties across the 95% mark: 90% of the ID scores at 2, 10% at 1 with every OOD score; |0.90 - 0.95| is
    # below |1.00 - 0.95| in float64, so the paper's code keeps 90% of ID at threshold 2: FPR 0; ours keeps all: FPR 1
    is_id = np.r_[np.ones(100, dtype=np.int64), np.zeros(100, dtype=np.int64)]
    scores = np.r_[np.full(90, 2.0), np.full(10, 1.0), np.full(100, 1.0)]
    args = torch.from_numpy(scores), torch.from_numpy(is_id)
    assert paper_fpr(is_id, scores) == fpr_at_tpr(*args, threshold="closest").item() == 0.0
    assert first_at_tpr_fpr(is_id, scores) == fpr_at_tpr(*args).item() == 1.0
    # scores rounded to integers (heavy ties): 0.22 apart on average, up to 0.28
    gaps = []
    for seed in range(40):
        is_id, scores = case(seed, 400, 400, 0)
        gaps.append(abs(paper_fpr(is_id, scores) - first_at_tpr_fpr(is_id, scores)))
    assert max(gaps) > 0.25 and np.mean(gaps) > 0.15
    # continuous scores: only the OOD scores between the 95% ID score and the next lower one (~1/n_id) apart
    is_id, scores = case(0, 10_000, 10_000, None)
    gap = paper_fpr(is_id, scores) - first_at_tpr_fpr(is_id, scores)
    assert 0 <= gap < 2e-3


def _ddp_worker(rank: int, port: str, scores: torch.Tensor, is_id: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metrics = OODMetrics(threshold="closest")
        share = slice(rank, None, 2)  # unequal shares: 401 and 400
        metrics.update(scores[share], is_id[share])
        out[rank] = metrics.compute()["fpr95"].item()
    finally:
        dist.destroy_process_group()


def test_closest_is_synchronised_across_processes():
    is_id, scores = case(3, 451, 350, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, torch.from_numpy(scores), torch.from_numpy(is_id), out), nprocs=2)
    assert out[0] == out[1] == paper_fpr(is_id, scores)


def test_the_option_is_checked_recorded_and_labelled():
    from lightning_ood.module import OODClassifier

    with pytest.raises(ConfigError, match="fpr_threshold must be 'first_at_tpr' or 'closest'"):
        OODClassifier(backbone="resnet20", num_classes=3, scorers=["msp"], fpr_threshold="nearest")
    with pytest.raises(ValueError, match="threshold must be one of"):
        FPRAtTPR(threshold="nearest")
    model = OODClassifier(backbone="resnet20", num_classes=3, scorers=["msp"], fpr_threshold="closest")
    assert model.provenance()["fpr_threshold"] == "closest"
    metrics = {"msp": {"noise": {"fpr95": 0.5, "auroc": 0.8, "aupr_in": 0.7, "aupr_out": 0.6}}}
    plain = OODReport("cifar10", "resnet18", 0.9, metrics, provenance={"fpr_threshold": "first_at_tpr"})
    closest = OODReport("cifar10", "resnet18", 0.9, metrics, provenance={"fpr_threshold": "closest"})
    assert plain.fpr_label == "FPR95" and closest.fpr_label == "FPR95 (closest TPR)"
    assert (
        "FPR95 (closest TPR)" in closest.to_markdown() and "closest" not in plain.to_markdown().split("Provenance")[0]
    )
    assert "FPR95 (closest TPR)" in closest.to_latex() and "closest" not in plain.to_latex()
