"""GMM (OpenOOD's ``gmm``; lightning_ood/scoring/gmm.py) against sklearn's PCA and GaussianMixture, which OpenOOD's
GMM calls, and OpenOOD's score, on random features with ties and zeros.

pytorch-ood 0.4's ``GMM`` is another method: one Gaussian per class with its own covariance, fitted from the
labels (no EM, no projection); OpenOOD's fits a tied mixture by EM without labels on PCA-projected features, and
so do we."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from torch import nn

from lightning_ood.errors import FitError
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.gmm import fit_tied_gmm, kmeans_labels
from lightning_ood.statistics import FeatureStatistics
from tests.scoring.conftest import fitted64, in_float64, toy_problem_in_the_bank
from tests.scoring.conftest import fitted_on_statistics as fitted


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_in_the_bank``."""
    return toy_problem_in_the_bank()


# ============================================================================================ GMM


def openood_gmm_score(z, gm) -> np.ndarray:
    """OpenOOD's ``compute_GMM_score`` (gmm_postprocessor.py lines 152-163) + ``log(. + 1e-45)`` (line 55), float64."""
    terms = []
    for mean in gm.means_:
        zero_f = z - mean
        terms.append(np.exp(-0.5 * ((zero_f @ gm.precisions_) * zero_f).sum(1)))
    return np.log(np.stack(terms, 1) @ gm.weights_ + 1e-45)


def sklearn_initial_parameters(z, labels, k, reg=1e-6):
    """sklearn's ``GaussianMixture._initialize`` from one-hot responsibilities (tied), as numpy."""
    resp = np.eye(k)[labels]
    nk = resp.sum(0) + 10 * np.finfo(resp.dtype).eps
    means = resp.T @ z / nk[:, None]
    covariance = (z.T @ z - (nk * means.T) @ means) / nk.sum() + reg * np.eye(z.shape[1])
    return nk / len(z), means, np.linalg.inv(covariance)


def test_gmm_em_matches_sklearn_from_the_same_start(p):
    """OpenOOD's fit (PCA, then sklearn's tied GaussianMixture) started from our k-means labels: the same mixture and
    the same scores as ours (ours projects on the covariance's eigenvectors: sklearn's axes up to signs)."""
    components, dim = 6, 8
    x = p.train.double().numpy()
    axes = PCA(n_components=dim).fit(x).components_.T  # OpenOOD's reduce_feature_dim('pca_8')
    z = x @ axes
    labels = kmeans_labels(torch.tensor(z), components, seed=0).numpy()
    weights, means, precision = sklearn_initial_parameters(z, labels, components)
    gm = GaussianMixture(components, covariance_type="tied", random_state=0, weights_init=weights,
                         means_init=means, precisions_init=precision).fit(z)  # fmt: skip
    ours_w, ours_mu, chol = fit_tied_gmm(torch.tensor(z), torch.tensor(labels), components)
    np.testing.assert_allclose(ours_w.numpy(), gm.weights_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours_mu.numpy(), gm.means_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose((chol @ chol.T).numpy(), gm.precisions_, rtol=1e-5, atol=1e-6)
    expected = openood_gmm_score(p.test.double().numpy() @ axes, gm)
    scores = in_float64(fitted64(p, "gmm", components=components, dim=dim), p.test, p.head)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)


def blobs(seed=0, k=4, per=60, dim=10):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 40, (k, dim))
    labels = np.arange(k * per) % k
    return (centres[labels] + rng.normal(0, 1, (k * per, dim))).astype(np.float16).astype(np.float64), labels, centres


def test_gmm_end_to_end_equals_openood_on_separated_clusters():
    """OpenOOD's whole pipeline (sklearn's own k-means, random_state=0) and ours (our seeded k-means++) find the same
    partition of well-separated clusters, hence the same mixture and scores; beyond OpenOOD's float floor (its sum
    below 1e-45) ours keep their order."""
    x, labels, centres = blobs()
    head = nn.Linear(10, 4)
    stats = FeatureStatistics.from_features(torch.tensor(x).float(), torch.tensor(labels), 4, head)
    rng = np.random.default_rng(1)
    near = centres[np.arange(20) % 4] + rng.normal(0, 1.5, (20, 10))
    far = centres[0] + np.linspace(5, 40, 8)[:, None] * np.ones(10) / np.sqrt(10)  # moving away from a cluster
    test = np.concatenate([near, far])
    axes = PCA(n_components=6).fit(x).components_.T
    gm = GaussianMixture(4, covariance_type="tied", random_state=0).fit(x @ axes)
    expected = openood_gmm_score(test @ axes, gm)
    scorer = build_scorer("gmm", components=4, dim=6).fit_statistics(stats, head)
    scores = in_float64(scorer, torch.tensor(test), head)
    above_floor = expected > np.log(1e-30)
    assert above_floor[:20].all() and not above_floor.all()
    np.testing.assert_allclose(scores[above_floor], expected[above_floor], rtol=1e-6, atol=1e-6)
    assert (np.diff(scores[20:]) < 0).all()  # farther -> lower, also where OpenOOD's scores all tie at its floor
    ours_labels = kmeans_labels(torch.tensor(x @ axes), 4).numpy()
    theirs = KMeans(4, n_init=1, random_state=0).fit(x @ axes).labels_
    assert len(set(zip(ours_labels, theirs, strict=True))) == 4  # the same partition, up to the cluster names


def test_gmm_with_more_clusters_than_groups_and_its_guards(p):
    """Empty-cluster relocation and many components on few points stay finite; more axes than units keep them all."""
    scores = fitted(p, "gmm", components=40, dim=12).score(p.test, p.head(p.test))
    assert torch.isfinite(scores).all()
    labels = kmeans_labels(torch.tensor(p.train.double().numpy()), 40)
    assert len(labels.unique()) == 40  # every cluster holds points
    all_axes, unprojected = fitted(p, "gmm"), fitted(p, "gmm", dim=None)  # 50 axes of 12-d features: all 12
    logits = p.head(p.test)
    torch.testing.assert_close(all_axes.score(p.test, logits), unprojected.score(p.test, logits))
    small = FeatureStatistics.from_features(p.train[:30], p.labels[:30], p.C, p.head)
    with pytest.raises(FitError, match="50 mixture components need at least 50 training features in the bank, which "
                                       "holds 30: lower components to at most 30"):  # fmt: skip
        build_scorer("gmm", components=50, dim=4).fit_statistics(small, p.head)  # never fewer components than asked
    few = build_scorer("gmm", components=30, dim=4).fit_statistics(small, p.head)
    assert few.centres.shape == (30, 4) and torch.isfinite(few.score(p.test, p.head(p.test))).all()


# ============================================================================================ device and dtype


@pytest.mark.parametrize("name", ["gmm", "cfood", "grood"])
def test_fitted_tensors_are_buffers_that_follow_the_scorer(p, name):
    """``double()`` and ``to("meta")`` move every fitted tensor (tests/test_device.py does so for every registered
    scorer through a real test pass, these four included)."""
    kwargs = {"gmm": {"components": 5, "dim": 8}}.get(name, {})
    scorer = fitted(p, name, **kwargs)
    assert len(list(scorer.buffers())) >= 3
    scorer.double()
    assert all(t.dtype == torch.float64 for t in scorer.buffers() if t.is_floating_point())
    scorer.to("meta")
    assert all(t.device.type == "meta" for t in scorer.buffers())
