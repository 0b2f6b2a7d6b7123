"""CARef and CADRef (Ling et al., CVPR 2025; lightning_ood/scoring/caref.py) against numpy computations written from
the authors' code (LingAndZero/CADRef ``ood_methods/CARef.py``, ``CADRef.py``, ``utils/get_stat.py``), on random
features with ties and zeros; neither pytorch-ood 0.4 nor OpenOOD implements them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from torch import nn

from lightning_ood.scoring import build_scorer
from tests.scoring.conftest import bank_statistics as statistics
from tests.scoring.conftest import ours, toy_problem_with_a_float64_head


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_with_a_float64_head``."""
    return toy_problem_with_a_float64_head()


def close(a, b, rtol=1e-9, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def predicted_means(p):  # get_stat.py: training features grouped by the predicted class; CARef.get_mean_feature
    predicted = (p.X @ p.W.T + p.b).argmax(1)
    assert len(np.unique(predicted)) == p.C  # every class predicted: the authors' code needs it
    return np.stack([p.X[predicted == c].mean(0) for c in range(p.C)])


def test_caref(p):
    means = predicted_means(p)
    predicted = (p.T @ p.W.T + p.b).argmax(1)
    l1 = np.abs(p.T).sum(1)
    expected = -np.abs(means[predicted] - p.T).sum(1) / np.maximum(l1, 1e-12)
    close(ours(p, "caref"), expected)


def gen_score(z):  # CADRef.py gen(): 1 / sum over the top max(C // 10, 10) probabilities, gamma 0.1
    probs = np.sort(softmax(z, axis=1), axis=1)[:, -max(z.shape[1] // 10, 10) :]
    return 1 / (probs**0.1 * (1 - probs) ** 0.1).sum(1)


LOGIT_SCORES = {
    "energy": lambda z: logsumexp(z, axis=1),
    "msp": lambda z: softmax(z, axis=1).max(1),
    "maxlogit": lambda z: z.max(1),
    "gen": gen_score,
}


@pytest.mark.parametrize("logit_score", list(LOGIT_SCORES))
def test_cadref(p, logit_score):
    means = predicted_means(p)
    score = LOGIT_SCORES[logit_score]
    train_mean_score = score(p.X @ p.W.T + p.b).mean()  # get_global_mean_logit_score: over every training image
    z = p.T @ p.W.T + p.b
    predicted = z.argmax(1)
    dist, sign = p.T - means[predicted], np.sign(p.W[predicted])
    l1 = np.maximum(np.abs(p.T).sum(1), 1e-12)
    positive = np.where(dist * sign < 0, 0, dist * sign).sum(1) / l1
    negative = np.where(-dist * sign < 0, 0, -dist * sign).sum(1) / l1
    expected = -(positive / score(z) + negative / train_mean_score)
    close(ours(p, "cadref", logit_score=logit_score), expected)


def test_cadref_statistics_do_not_depend_on_the_batches(p):
    batched = statistics(p.train, p.labels, p.head, batch=7)
    torch.testing.assert_close(batched.predicted_class_means, p.stats.predicted_class_means)
    torch.testing.assert_close(batched.predicted_class_counts, p.stats.predicted_class_counts)
    for name, value in p.stats.mean_logit_scores.items():
        torch.testing.assert_close(batched.mean_logit_scores[name], value)


def test_a_class_never_predicted_falls_back_to_its_labelled_mean(p):
    head = nn.Linear(p.L, p.C).double()
    with torch.no_grad():
        head.weight.copy_(p.head.weight)
        head.bias.copy_(p.head.bias)
        head.bias[2] = -1e3  # class 2 is never predicted
    stats = statistics(p.train, p.labels, head)
    assert stats.predicted_class_counts[2] == 0
    scorer = build_scorer("caref").fit_statistics(stats, head)
    torch.testing.assert_close(scorer.means[2], p.train[p.labels == 2].mean(0))
    torch.testing.assert_close(scorer.means[0], stats.predicted_class_means[0])


def test_predicted_means_survive_a_checkpoint(p, tmp_path):
    """The statistics as checkpoints store them (flat fields, loaded with ``weights_only=True``) fit CADRef alike."""
    from lightning_ood.statistics import FeatureStatistics

    torch.save(p.stats.cpu_state_dict(), tmp_path / "stats.pt")
    loaded = FeatureStatistics.from_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    scorer = build_scorer("cadref", logit_score="gen").fit_statistics(loaded, p.head)
    close(scorer.score(p.test, p.logits).numpy(), ours(p, "cadref", logit_score="gen"), rtol=0, atol=0)
