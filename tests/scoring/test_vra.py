"""VRA, VRA+, VRA++ (Xu et al., NeurIPS 2023) and OpenOOD's VRA (lightning_ood/scoring/vra.py) against numpy
computations written from the authors' code (zeroQiaoba/VRA) and OpenOOD's ``vra_postprocessor.py``, and
pytorch-ood 0.4's ``VRA``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from lightning_ood.scoring import build_scorer
from lightning_ood.statistics import FeatureSet
from tests.scoring.conftest import close, ours, theirs, toy_problem_with_unit_statistics
from tests.scoring.conftest import unit_statistics as statistics

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_with_unit_statistics``."""
    return toy_problem_with_unit_statistics()


def vra_reference(train, test, w, b, q1=None, q2=None, featmin=-1e6, featmax=1e6, lamb=0.0, a=0.0, m=1.0):
    """zeroQiaoba/VRA: per-unit quantiles of the training features (``ood_eval.py`` 154-160), ``x + lamb`` compared
    with the shifted thresholds, below to 0 and above to ``featmax`` (``models/resnet.py`` 206-209), energy
    (``util/score.py`` 93-109), VRA++'s ``-a sum (x0 - m)^2`` (81-91)."""
    if q1 is not None:
        featmin = np.quantile(train, q1, axis=0).astype(np.float32)
    if q2 is not None:
        featmax = np.quantile(train, q2, axis=0).astype(np.float32)
    x = test + np.float32(lamb)
    x = np.where(x < featmin + np.float32(lamb), 0.0, x)
    x = np.where(x > featmax + np.float32(lamb), np.broadcast_to(featmax, x.shape), x)
    return logsumexp(x.astype(np.float64) @ w.T + b, axis=1) - a * ((test.astype(np.float64) - m) ** 2).sum(axis=1)


@pytest.mark.parametrize(
    ("name", "kwargs", "reference"),
    [
        ("vra", {}, {"q1": 0.6, "q2": 0.9}),
        ("vra", {"lower": 30.0, "upper": 99.0}, {"q1": 0.3, "q2": 0.99}),
        ("vra_plus", {}, {"q1": 0.6, "q2": 0.95, "lamb": 0.6}),
        ("vra_plusplus", {}, {"q1": 0.5, "q2": 0.85, "a": 0.01, "m": 4.0}),
        ("vra", {"lower_clip": 0.5, "upper_clip": 1.0}, {"featmin": 0.5, "featmax": 1.0}),  # ImageNet's
        (
            "vra_plus",
            {"lower_clip": 0.6, "upper_clip": 0.7, "gamma": 0.3},
            {"featmin": 0.6, "featmax": 0.7, "lamb": 0.3},
        ),
        ("vra", {"lower": None}, {"q2": 0.9}),
    ],
)
def test_vra_follows_the_authors_code(p, name, kwargs, reference):
    train, test = p.train.numpy(), p.test.numpy()
    close(ours(p, name, **kwargs), vra_reference(train, test, p.W, p.b, **reference), rtol=1e-5, atol=1e-5)


def test_vra_thresholds_are_numpys_per_unit_quantiles_and_ties_stay(p):
    scorer = build_scorer("vra").fit_statistics(p.stats, p.head)
    close(scorer.alpha.numpy(), np.quantile(p.train.numpy(), 0.6, axis=0), rtol=0, atol=0)
    close(scorer.beta.numpy(), np.quantile(p.train.numpy(), 0.9, axis=0), rtol=0, atol=0)
    # a feature exactly at the thresholds keeps its values; just below alpha it is zeroed, above beta capped
    at = torch.where(torch.isfinite(scorer.alpha), scorer.alpha, 0.0)[None]
    torch.testing.assert_close(scorer.rectified(at), at)
    below = torch.nextafter(scorer.alpha, torch.tensor(-1.0))[None]
    assert (scorer.rectified(below)[:, scorer.alpha > 0] == 0).all()
    torch.testing.assert_close(scorer.rectified(scorer.beta[None] + 1), scorer.beta[None])
    # the dead unit: alpha = beta = 0, and a test value there is capped at 0
    assert scorer.alpha[3] == 0 and scorer.beta[3] == 0


def test_vra_statistic_is_the_same_in_any_batching_and_refuses_off_grid_percentiles(p):
    torch.testing.assert_close(statistics(p.train, p.labels, p.C, p.head, batches=9).unit_quantiles,
                               p.stats.unit_quantiles, rtol=0, atol=0)  # fmt: skip
    with pytest.raises(Exception, match="grid"):
        build_scorer("vra", lower=60.05).fit_statistics(p.stats, p.head)


def test_vra_openood_follows_openoods_postprocessor(p):
    """OpenOOD ``vra_postprocessor.py``: ``np.percentile`` of every ID-validation activation (lines 41-44), clip to
    [low, high] (49-50), ``logsumexp`` of the logits (55)."""
    val = p.train[::3]
    stats = statistics(p.train, p.labels, p.C, p.head)
    stats.reference["id_val"] = FeatureSet(val, p.head(val).detach(), p.labels[::3])
    log = val.numpy().flatten()
    low, high = np.percentile(log, 10), np.percentile(log, 90)
    expected = logsumexp(np.clip(p.T, low, high) @ p.W.T + p.b, axis=1)
    close(ours(p, "vra_openood", stats=stats), expected, rtol=1e-5, atol=1e-5)


def test_vra_per_unit_clamp_agrees_with_pytorch_ood_on_one_by_one_maps(p):
    """pytorch-ood clamps every element of the final feature map between its own quantiles: on 1 x 1 maps that is
    our per-unit rule with ``below="clamp"``. The authors zero what lies below alpha, so their VRA differs."""
    head = lambda z: p.head(z.flatten(1))  # noqa: E731
    vra = pytorch_ood.VRA(None, head, lower_percentile=0.6, upper_percentile=0.9)
    reference = vra.fit_feature_maps(p.train[:, :, None, None], p.labels).predict_feature_maps(p.test[:, :, None, None])
    close(ours(p, "vra", below="clamp"), -theirs(reference), rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours(p, "vra"), -theirs(reference), rtol=1e-3)
