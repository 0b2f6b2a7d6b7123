"""OOD metrics (ID = positive class) against scikit-learn, on random and hand-computed cases.

References:
- FPR at x% TPR: ``fpr[np.argmax(tpr >= x)]`` with ``roc_curve(is_id, scores, drop_intermediate=False)``;
- AUROC: ``roc_auc_score(is_id, scores)``;
- AUPR-In: ``average_precision_score(is_id, scores)``; AUPR-Out: ``average_precision_score(1 - is_id, -scores)``.
The references are computed on the float32 scores converted to float64: the values the metrics see.


And FPR95 as the paper's code computes it (HIMPLoS ``utils/test_utils.py``, ``fpr_and_fdr_at_recall`` called by
``get_measures`` with ID labelled 1 and ``recall_level = 0.95``): the threshold whose TPR is nearest to 95%,
``model.fpr_threshold: closest`` (numpy: ``paper_fpr`` of tests/references.py), against ours (``first_at_tpr``);
OpenOOD's FPR with OOD as the positive class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.classification import BinaryAUROC

from lightning_ood.errors import ConfigError
from lightning_ood.metrics import FPRAtTPR, OODMetrics, fpr_at_tpr, ood_metrics
from lightning_ood.report import OODReport
from tests.helpers import case
from tests.references import paper_fpr


def test_openood_fpr_has_ood_as_the_positive_class():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    id_scores, ood_scores = torch.tensor(rng.normal(1, 1, 500)), torch.tensor(rng.normal(0, 1, 300))
    ours_ood = ood_metrics(id_scores, ood_scores, positive="ood")["fpr95"]
    labels = np.r_[np.zeros(500), np.ones(300)]  # OOD positive, scores negated (higher = more OOD)
    fpr, tpr, _ = roc_curve(labels, -np.r_[id_scores.numpy(), ood_scores.numpy()], drop_intermediate=False)
    assert ours_ood == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")])
    assert ours_ood != pytest.approx(ood_metrics(id_scores, ood_scores)["fpr95"])  # a different number


def first_at_tpr_fpr(is_id: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """Ours, independently: the largest score keeping at least ``tpr`` of the ID scores."""
    id_scores = np.sort(scores[is_id == 1])[::-1]
    kept = np.arange(1, id_scores.size + 1) / id_scores.size
    threshold = id_scores[np.argmax(kept >= tpr)]
    return float(np.mean(scores[is_id == 0] >= threshold))


@pytest.mark.numerics
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


@pytest.mark.numerics
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


@pytest.mark.numerics
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


NUM_RANDOM_CASES = 1000
NUM_CHUNKS = 4  # the random cases run as 4 test items of 250 cases each


def sklearn_fpr(is_id: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    fpr, tpr_curve, _ = roc_curve(is_id, scores, drop_intermediate=False)
    return float(fpr[np.argmax(tpr_curve >= tpr)])


def random_case(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 scores (|s| > 20 often) and 0/1 labels; sizes from 1 to ~3,000 per side; odd cases heavily tied."""
    n_id = int(np.exp(rng.uniform(0, np.log(3000))))
    n_ood = int(np.exp(rng.uniform(0, np.log(3000))))
    scores = np.r_[rng.normal(0.0, 30.0, n_id) + rng.uniform(0, 40), rng.normal(0.0, 30.0, n_ood)]
    if index % 2:  # heavy ties, also between ID and OOD
        scores = np.round(scores / rng.choice([1.0, 5.0, 20.0]))
    is_id = np.r_[np.ones(n_id, dtype=np.int64), np.zeros(n_ood, dtype=np.int64)]
    order = rng.permutation(n_id + n_ood)
    return scores.astype(np.float32)[order], is_id[order]


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", range(NUM_CHUNKS))
def test_random_cases_match_sklearn(chunk):
    per_chunk = NUM_RANDOM_CASES // NUM_CHUNKS
    rng = np.random.default_rng(1000 + chunk)
    metrics = OODMetrics()
    fpr_metric = FPRAtTPR()
    tied = 0
    for index in range(per_chunk):
        scores32, is_id = random_case(rng, index)
        scores64 = scores32.astype(np.float64)  # what the metrics see
        tied += len(np.unique(scores64)) < len(scores64)
        scores, target = torch.from_numpy(scores32), torch.from_numpy(is_id)

        expected_fpr = sklearn_fpr(is_id, scores64)
        assert fpr_at_tpr(scores, target).item() == expected_fpr, index
        fpr_metric.reset()
        fpr_metric.update(scores, target)
        assert fpr_metric.compute().item() == expected_fpr, index

        metrics.reset()
        metrics.update(scores, target)
        result = {k: v.item() for k, v in metrics.compute().items()}
        assert result["fpr95"] == expected_fpr
        assert result["auroc"] == pytest.approx(roc_auc_score(is_id, scores64), abs=1e-6)
        assert result["aupr_in"] == pytest.approx(average_precision_score(is_id, scores64), abs=1e-6)
        assert result["aupr_out"] == pytest.approx(average_precision_score(1 - is_id, -scores64), abs=1e-6)
    assert tied >= 0.4 * per_chunk  # the rounded half really has ties (tiny cases may have none)


@pytest.mark.numerics
def test_fpr_hand_computed():
    id_scores = torch.arange(1, 21, dtype=torch.float32)  # 1..20: 19 of 20 (95%) are >= 2, so the threshold is 2
    ood_scores = torch.tensor([0.0, 1.5, 2.0, 2.5, 10.0])  # OOD >= 2: {2, 2.5, 10} -> 3 / 5 (a tie at t counts)
    scores = torch.cat([id_scores, ood_scores])
    is_id = torch.cat([torch.ones(20), torch.zeros(5)])
    assert fpr_at_tpr(scores, is_id).item() == 0.6
    # 100 ID scores 1..100: the threshold is the 95th largest = 6; OOD >= 6: {6, 7} of 3.
    scores = torch.cat([torch.arange(1, 101, dtype=torch.float32), torch.tensor([5.5, 6.0, 7.0])])
    is_id = torch.cat([torch.ones(100), torch.zeros(3)])
    assert fpr_at_tpr(scores, is_id).item() == pytest.approx(2 / 3, abs=0)
    # TPR 80% of 1..20: 16 ID scores >= 5; OOD >= 5: {5, 6} of 4.
    scores = torch.cat([id_scores, torch.tensor([4.9, 5.0, 6.0, -1.0])])
    is_id = torch.cat([torch.ones(20), torch.zeros(4)])
    assert fpr_at_tpr(scores, is_id, tpr=0.8).item() == 0.5
    # One ID sample: TPR 95% needs it, so t is its score.
    assert fpr_at_tpr(torch.tensor([1.0, 0.0, 1.0, 2.0]), torch.tensor([1, 0, 0, 0])).item() == pytest.approx(2 / 3)


@pytest.mark.numerics
def test_drop_intermediate_would_skip_the_95_percent_point():
    # ID 1..20, OOD {1, 2, 3}: the points at t = 3, 2, 1 each add one ID and one OOD, so they are collinear and
    # sklearn's default drop_intermediate=True removes t = 2 (TPR exactly 0.95, FPR 2/3); the first kept point with
    # TPR >= 0.95 is then t = 1 (TPR 1, FPR 1).
    scores = np.r_[np.arange(1, 21), [1.0, 2.0, 3.0]].astype(np.float64)
    is_id = np.r_[np.ones(20, dtype=int), np.zeros(3, dtype=int)]
    fpr_dropped, tpr_dropped, _ = roc_curve(is_id, scores)  # drop_intermediate=True
    default_fpr = fpr_dropped[np.argmax(tpr_dropped >= 0.95)]
    assert default_fpr == 1.0
    assert sklearn_fpr(is_id, scores) == pytest.approx(2 / 3, abs=0)
    ours = fpr_at_tpr(torch.from_numpy(scores).float(), torch.from_numpy(is_id)).item()
    assert ours == pytest.approx(2 / 3, abs=0)
    assert default_fpr - ours == pytest.approx(1 / 3)


@pytest.mark.numerics
def test_sigmoid_pitfall_energy_scores():
    """Energy-like scores (|s| > 20): torchmetrics' default sigmoid saturates them into ties; ours does not."""
    rng = np.random.default_rng(7)
    scores = np.r_[rng.normal(25, 3, 2000), rng.normal(22, 3, 2000)].astype(np.float32)
    is_id = np.r_[np.ones(2000, dtype=np.int64), np.zeros(2000, dtype=np.int64)]
    order = rng.permutation(len(scores))
    scores, is_id = scores[order], is_id[order]
    expected = roc_auc_score(is_id, scores.astype(np.float64))
    assert 0.7 < expected < 0.85

    ours, default = OODMetrics(), BinaryAUROC()
    for batch in np.array_split(np.arange(len(scores)), 8):
        s, y = torch.from_numpy(scores[batch]), torch.from_numpy(is_id[batch])
        ours.update(s, y)
        default.update(s, y)
    assert ours.compute()["auroc"].item() == pytest.approx(expected, abs=1e-6)
    assert abs(default.compute().item() - expected) > 0.01  # why normalization=None matters


@pytest.mark.numerics
def test_batching_and_order_invariance():
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(np.round(rng.normal(0, 30, 3001)).astype(np.float32))  # ties included
    is_id = torch.from_numpy((rng.random(3001) < 0.4).astype(np.int64))
    whole = OODMetrics()
    whole.update(scores, is_id)
    expected = whole.compute()

    batched = OODMetrics()
    order = torch.from_numpy(rng.permutation(3001))
    for batch in torch.split(order, 37):
        batched.update(scores[batch], is_id[batch])
    result = batched.compute()
    assert expected.keys() == result.keys() == {"fpr95", "auroc", "aupr_in", "aupr_out"}
    for key in expected:
        assert torch.equal(result[key], expected[key]), key


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("scores", "is_id", "match"),
    [
        ([1.0, 2.0, 3.0], [1, 1, 1], "OOD"),
        ([1.0, 2.0, 3.0], [0, 0, 0], "ID"),
        ([1.0, float("nan"), 3.0], [1, 0, 1], "NaN"),
    ],
    ids=["no-ood", "no-id", "nan"],
)
def test_invalid_inputs_raise(scores, is_id, match):
    scores, is_id = torch.tensor(scores), torch.tensor(is_id)
    with pytest.raises(ValueError, match=match):
        fpr_at_tpr(scores, is_id)
    metric = FPRAtTPR()
    metric.update(scores, is_id)
    with pytest.raises(ValueError, match=match):
        metric.compute()
    collection = OODMetrics()
    collection.update(scores, is_id)
    with pytest.raises(ValueError, match=match):
        collection.compute()


@pytest.mark.numerics
@pytest.mark.parametrize("tpr", [0.8, 0.5, 0.9, 0.99, 1.0])
def test_tpr_parameter(tpr):
    rng = np.random.default_rng(int(tpr * 100))
    for index in range(50):
        scores32, is_id = random_case(rng, index)
        expected = sklearn_fpr(is_id, scores32.astype(np.float64), tpr)
        metric = FPRAtTPR(tpr=tpr)
        metric.update(torch.from_numpy(scores32), torch.from_numpy(is_id))
        assert metric.compute().item() == expected
        assert fpr_at_tpr(torch.from_numpy(scores32), torch.from_numpy(is_id), tpr).item() == expected
    collection = OODMetrics(tpr=tpr)
    collection.update(torch.from_numpy(scores32), torch.from_numpy(is_id))
    assert collection.compute()["fpr95"].item() == expected


@pytest.mark.numerics
@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5])
def test_invalid_tpr(tpr):
    with pytest.raises(ValueError, match="tpr"):
        FPRAtTPR(tpr=tpr)


@pytest.mark.numerics
def test_fpr_differs_from_strict_and_from_ood_positive_conventions():
    """Ours counts OOD scores equal to the threshold; OOD-positive FPR95 (OpenOOD) is a different number."""
    rng = np.random.default_rng(11)
    scores = np.round(rng.normal(0, 3, 400)).astype(np.float32)
    is_id = np.r_[np.ones(200, dtype=np.int64), np.zeros(200, dtype=np.int64)]
    scores[:200] += 2
    ours = fpr_at_tpr(torch.from_numpy(scores), torch.from_numpy(is_id)).item()
    ood_positive = sklearn_fpr(1 - is_id, -scores.astype(np.float64))
    t = np.sort(scores[:200])[::-1][189]  # 190 = 95% of 200 ID scores are >= t
    assert ours == np.mean(scores[200:] >= t) != np.mean(scores[200:] > t)
    assert ours != ood_positive
