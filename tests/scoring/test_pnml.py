"""pNML (Bibas, Feder & Hassner, NeurIPS 2021; lightning_ood/scoring/pnml.py) against a numpy computation written
from the authors' code (kobybibas/pnml_ood_detection) and pytorch-ood 0.4's ``PNML``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch import nn

from lightning_ood.scoring import build_scorer
from tests.scoring.conftest import close, ours, theirs, toy_problem_with_unit_statistics
from tests.scoring.conftest import unit_statistics as statistics

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_with_unit_statistics``."""
    return toy_problem_with_unit_statistics()


def pnml_reference(train: np.ndarray, test: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """kobybibas/pnml_ood_detection ``src/lit_utils/baseline_lit_utils.py``: features normalised and the head run on
    them (lines 63-74), ``pinv(X^T X, rcond=1e-15)`` (105-116), the regret (184-202), scored as ``1 - regret``
    (171)."""
    x = train / np.linalg.norm(train, axis=1, keepdims=True)
    inverse = np.linalg.pinv(x.T @ x, rcond=1e-15)
    u = test / np.linalg.norm(test, axis=1, keepdims=True)
    probs = softmax(u @ w.T + b, axis=1)
    projection = np.abs(np.einsum("nl,lk,nk->n", u, inverse, u))
    g = (projection / (1 + projection))[:, None]
    regret = np.log((probs / (probs + (1 - probs) * probs**g)).sum(axis=1)) / np.log(probs.shape[1])
    return 1 - regret


def test_pnml_follows_the_authors_code(p):
    expected = pnml_reference(p.X, p.T[:-1], p.W, p.b)
    close(ours(p, "pnml")[:-1], expected, rtol=1e-6, atol=1e-8)
    # the feature is normalised before everything: a scaled feature scores the same; regrets lie in [0, 1]
    scorer = build_scorer("pnml").fit_statistics(p.stats, p.head)
    scores = scorer.score(p.test, p.logits)
    torch.testing.assert_close(scorer.score(3 * p.test, p.logits), scores)
    assert (scores >= 0).all() and (scores <= 1).all()


def test_pnml_agrees_with_pytorch_ood(p):
    """pytorch-ood returns the regret; it runs in float32 with torch's default pinv cut-off and clamps p to 1e-12."""
    reference = pytorch_ood.PNML(None, p.head).fit_features(p.train, p.labels).predict_features(p.test)
    close(ours(p, "pnml"), 1 - theirs(reference), rtol=1e-4, atol=1e-5)


def test_pnml_is_finite_where_the_softmax_saturates(p):
    """Logits far apart (p = 0 and p = 1 in float64): each genie is its limit, 0 or 1; the authors' form is 0 / 0."""
    head = nn.Linear(p.L, p.C)
    with torch.no_grad():
        head.weight.copy_(p.head.weight * 2000)
        head.bias.zero_()
    scorer = build_scorer("pnml").fit_statistics(p.stats, head)
    scores = scorer.score(p.test, head(p.test)).double()
    assert torch.isfinite(scores).all() and (scores <= 1 + 1e-12).all()


def test_pnml_statistic_is_the_same_in_any_batching(p):
    torch.testing.assert_close(statistics(p.train, p.labels, p.C, p.head, batches=7).unit_outer, p.stats.unit_outer)
    x = F.normalize(p.train.double(), dim=1)
    torch.testing.assert_close(p.stats.unit_outer, x.T @ x)
