"""ORA (Demirel, Fumero & Locatello, NeurIPS 2025; lightning_ood/scoring/ora.py) against a numpy computation
written from the authors' ``ora_score`` loop, with the centre from the training class means or from the
authors' ID test class means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ood.scoring import build_scorer
from tests.scoring.conftest import bank_statistics as statistics
from tests.scoring.conftest import toy_problem_with_a_float64_head


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_with_a_float64_head``."""
    return toy_problem_with_a_float64_head()


def close(a, b, rtol=1e-9, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def ora_reference(p, centre):
    """``ora_score`` (util/ood_methods.py lines 156-216): per class, the feature projected onto the boundary with
    the predicted class, both centred and normalised (F.normalize, eps 1e-12), arccos / pi; NaN -> 0; the max."""
    z = p.T @ p.W.T + p.b
    predicted = z.argmax(1)

    def normalise(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    angles = np.zeros((len(p.T), p.C))
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in range(p.C):
            diff = p.W[predicted] - p.W[c]
            moved = p.T - ((z.max(1) - z[:, c]) / np.linalg.norm(diff, axis=1) ** 2)[:, None] * diff
            cos = (normalise(p.T - centre) * normalise(moved - centre)).sum(1)
            angles[:, c] = np.arccos(cos) / np.pi
    return np.nan_to_num(angles, nan=0.0).max(1)


def test_ora(p):
    """The centre is the unweighted mean of the class means: unbalanced classes here (half of class 0 left out)."""
    keep = (p.labels != 0) | (torch.arange(len(p.labels)) % 2 == 0)
    stats = statistics(p.train[keep], p.labels[keep], p.head)
    x, y = p.X[keep.numpy()], p.labels[keep].numpy()
    centre = np.stack([x[y == c].mean(0) for c in range(p.C)]).mean(0)
    scores = build_scorer("ora").fit_statistics(stats, p.head).score(p.test, p.logits).numpy()
    close(scores, ora_reference(p, centre), rtol=1e-7, atol=1e-8)


def test_ora_with_the_authors_id_test_class_means(p):
    """The authors' centre: the mean class mean of ID test features (here: a labelled set with one class absent)."""
    import dataclasses

    from lightning_ood.statistics import FeatureSet

    keep = p.labels != 4
    ref = FeatureSet(p.train[keep][::3], p.head(p.train[keep][::3]).detach(), p.labels[keep][::3])
    stats = dataclasses.replace(p.stats, reference={"id_test": ref})
    scorer = build_scorer("ora", reference="id_test").fit_statistics(stats, p.head)
    x, y = ref.features.numpy(), ref.labels.numpy()
    centre = np.stack([x[y == c].mean(0) for c in range(4)]).mean(0)
    close(scorer.score(p.test, p.logits).numpy(), ora_reference(p, centre), rtol=1e-7, atol=1e-8)
