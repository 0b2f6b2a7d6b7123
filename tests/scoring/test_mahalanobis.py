"""Mahalanobis and RMDS (lightning_ood/scoring/mahalanobis.py) against sklearn's ``EmpiricalCovariance``, numpy's and
scipy's pseudo-inverses and pytorch-ood 0.4, on singular covariances too (the Mahalanobis family shares their
terms: Mahalanobis++ and RMDS++ included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import pinvh
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from lightning_ood.errors import FitError
from lightning_ood.scoring import build_scorer
from lightning_ood.statistics import FeatureStatistics
from tests.helpers import make_problem, random_problem
from tests.references import ref_class_means
from tests.scoring.conftest import assert_scores, close, ours, score_with, theirs

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def ref_mahalanobis(h, train, labels, num_classes):
    means = ref_class_means(train, labels, num_classes)
    centred = np.concatenate([train[labels == c] - means[c] for c in range(num_classes)])
    cov = EmpiricalCovariance(assume_centered=False).fit(centred).covariance_
    P = np.linalg.pinv(cov)
    return np.array([max(-(x - m) @ P @ (x - m) for m in means) for x in h])


@pytest.mark.numerics
def test_mahalanobis_matches_sklearn_and_pinv(prob):
    expected = ref_mahalanobis(prob.test64, prob.train64, prob.labels64, prob.num_classes)
    assert_scores(score_with("mahalanobis", prob), expected)
    assert (expected < 0).all()


def ref_gaussian_scores(name: str, train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int):
    """The Mahalanobis family from centred numpy covariances and scipy's ``pinvh`` (sklearn's): ``mahalanobis``,
    ``rmds`` and, on L2-normalised features, ``mahalanobis_pp`` and ``rmds_pp``."""
    if name.endswith("_pp"):
        norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)  # noqa: E731
        train, test = norm(train), norm(test)
    means = np.stack([train[labels == c].mean(0) for c in range(classes)])
    centred = train - means[labels]
    precision = pinvh(centred.T @ centred / len(train))
    d = np.stack([np.einsum("ij,jk,ik->i", test - m, precision, test - m) for m in means], axis=1)  # (N, C)
    if not name.startswith("rmds"):
        return -d.min(1)
    mean = train.mean(0)
    background = pinvh((train - mean).T @ (train - mean) / len(train))
    d0 = np.einsum("ij,jk,ik->i", test - mean, background, test - mean)
    return -(d - d0[:, None]).min(1)


GAUSSIAN_SCORERS = ["mahalanobis", "rmds", "mahalanobis_pp", "rmds_pp"]


@pytest.mark.numerics
@pytest.mark.parametrize("name", GAUSSIAN_SCORERS)
@pytest.mark.parametrize("case", ["dead-unit", "duplicate-unit", "more-units-than-samples", "offset-features"])
def test_gaussian_scorers_on_singular_covariances_match_a_pinvh_reference(case, name):
    """Rank-deficient covariances: dead and duplicated units, fewer images than units (rounding noise of either sign
    in the null space, which a default-cutoff pseudo-inverse turned into scores of 1e16), and features far from 0
    (the textbook E[hh^T] - mu mu^T leaves noise of the size of mu^2): the scores are those of centred numpy
    covariances and scipy's pinvh."""
    p0 = random_problem(2, n_train=48 if case != "more-units-than-samples" else 8, dim=10)
    train, test = p0.train64.copy(), p0.test64.copy()
    if case == "dead-unit":
        train[:, 3] = 0.0
        test[:, 3] = 0.0
    elif case == "duplicate-unit":
        train[:, 5] = train[:, 4]
        test[:, 5] = test[:, 4]
    elif case == "offset-features":  # every feature around 300, a spread of ~1, one constant unit
        train, test = train + 300.0, test + 300.0
        train[:, 2] = test[:, 2] = 300.0
    p = make_problem(train, p0.labels64, test, p0.W, p0.b)
    scores = score_with(name, p)
    assert np.isfinite(scores).all()
    expected = ref_gaussian_scores(name, p.train64, p.labels64, p.test64, p.num_classes)
    scale = np.abs(expected).max()
    assert_scores(scores, expected, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.numerics
@pytest.mark.parametrize("name", GAUSSIAN_SCORERS)
def test_gaussian_scorers_refuse_one_image_per_class(name):
    """One training image per class: the within-class covariance is zero (every image is its class mean), and a
    pseudo-inverse of it would score noise (a constant, or whatever the rounding gives): refused, saying why."""
    p0 = random_problem(3, num_classes=4, n_train=4, dim=10)
    with pytest.raises(FitError, match=r"within-class covariance of its 4 training images \(4 classes, one image "
                                       r"each\) is zero up to rounding: it needs two different images of one class "
                                       r"at least \(5 images or more\)"):  # fmt: skip
        build_scorer(name).fit(p0.train, p0.labels, p0.head)


def test_rmds(p):
    means = np.stack([p.X[p.y == c].mean(0) for c in range(p.C)])
    centred = p.X - means[p.y]
    precision = np.linalg.pinv(centred.T @ centred / p.N)
    background = np.linalg.pinv(np.cov(p.X.T, bias=True))
    mu0 = p.X.mean(0)
    d = np.stack([(((p.T - m) @ precision) * (p.T - m)).sum(1) for m in means], 1)
    d0 = (((p.T - mu0) @ background) * (p.T - mu0)).sum(1)
    close(ours(p, "rmds"), -(d - d0[:, None]).min(1), rtol=1e-5, atol=1e-5)
    # pytorch-ood inverts the (undivided) scatter plus 1e-6 I, which a dead unit makes huge, where we take the
    # pseudo-inverse: compare without the dead unit
    live = [u for u in range(p.L) if u != 3]
    head = nn.Linear(len(live), p.C).double()
    with torch.no_grad():
        head.weight.copy_(p.head.weight[:, live]), head.bias.copy_(p.head.bias)
    train, test = p.train[:, live].double(), p.test[:, live].double()
    stats = FeatureStatistics.from_features(train, p.labels, p.C, head)
    mine = build_scorer("rmds").fit_statistics(stats, head).score(test, head(test)).numpy()
    reference = pytorch_ood.RMD(None).fit_features(train.float(), p.labels).predict_features(test.float())
    close(mine, -p.N * theirs(reference), rtol=1e-3, atol=1e-2)  # pytorch-ood: the scatter is not divided by N
