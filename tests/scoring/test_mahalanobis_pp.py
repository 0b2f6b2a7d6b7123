"""Mahalanobis++ / RMDS++ (Mueller & Hein, ICML 2025; lightning_ood/scoring/mahalanobis_pp.py) against a
re-implementation written here from the authors' code (numpy and sklearn, as they compute it) on random features
with ties and zeros, and against pytorch-ood 0.4's ``Mahalanobis`` and ``RMD`` on normalised features; and the
fitted tensors of these, NECO and MahalanobisODIN follow ``double()`` and ``to('meta')``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.mahalanobis_pp import UnitGaussians
from lightning_ood.statistics import (
    FeatureStatistics,
    Reducers,
    StatisticsAccumulator,
    StatisticsSetup,
    build_statistics,
)
from tests.scoring.conftest import accumulate, ours, toy_problem_in_float64

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


pytorch_ood = pytest.importorskip("pytorch_ood.detector")


FEATURE_SCORERS = ("mahalanobis_pp", "rmds_pp", "neco")


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_in_float64``."""
    return toy_problem_in_float64()


def close(a, b, rtol=1e-7, atol=1e-9):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ============================================================================================ Mahalanobis++, RMDS++


def authors_class_gaussian(train: np.ndarray, y: np.ndarray, num_classes: int):
    """maha-norm ``NINCO/detection_methods.py`` ``evaluate_Mahalanobis_norm``: class means and the precision of
    ``EmpiricalCovariance(assume_centered=True)`` of the class-centred normalised features."""
    means, centred = [], []
    for c in range(num_classes):
        fs = train[y == c]
        means.append(fs.mean(axis=0))
        centred.extend(fs - means[-1])
    return np.array(means), EmpiricalCovariance(assume_centered=True).fit(np.array(centred)).precision_


def test_unit_gaussians_are_the_normalised_features_moments_whatever_the_batches_and_ranks(p):
    u = normalised(p.X)
    means = np.stack([u[p.y == c].mean(0) for c in range(p.C)])
    within = sum((u[p.y == c] - means[c]).T @ (u[p.y == c] - means[c]) for c in range(p.C)) / p.N
    close(p.stats.unit_class_means.numpy(), means, rtol=1e-12, atol=1e-14)
    close(p.stats.unit_covariance.numpy(), within, rtol=1e-10, atol=1e-14)
    # two "ranks" on the two halves, their parts gathered in rank order as compute asks for them: the same statistics
    setup = StatisticsSetup(p.C, p.L, p.N)
    ranks = [build_statistics({UnitGaussians}, setup)["unit_gaussians"] for _ in range(2)]
    for rank, part in zip(ranks, (slice(0, 150), slice(150, None)), strict=True):
        acc = StatisticsAccumulator(p.C, p.L, extras={"unit_gaussians": rank})
        acc.update(p.train[part], p.labels[part], torch.arange(p.N)[part], p.head(p.train[part]).detach())
    second = ranks[1].gaussians
    other = [second.counts[None], second.means[None], second.scatter[None]]
    reduced = ranks[0].compute({"counts": p.stats.counts.double(), "n": torch.tensor(float(p.N), dtype=torch.float64)},
                               Reducers(gather=lambda t: torch.cat([t, other.pop(0)])))  # fmt: skip
    assert not other  # every part was gathered
    close(reduced["unit_class_means"].numpy(), means, rtol=1e-12, atol=1e-14)
    close(reduced["unit_covariance"].numpy(), within, rtol=1e-10, atol=1e-14)


def test_mahalanobis_pp_matches_the_authors_code(p):
    means, precision = authors_class_gaussian(normalised(p.X), p.y, p.C)
    with np.errstate(invalid="ignore"):
        t = normalised(p.T)  # the zero row becomes NaN there
    expected = -np.stack([(((t - m) @ precision) * (t - m)).sum(-1) for m in means], 1).min(1)
    mine = ours(p, "mahalanobis_pp")
    close(mine[:-1], expected[:-1], rtol=1e-8, atol=1e-8)
    assert np.isnan(expected[-1]) and np.isfinite(mine[-1])  # a zero feature: kept at zero here
    # not plain Mahalanobis: the normalisation matters
    assert not np.allclose(mine[:-1], ours(p, "mahalanobis")[:-1], rtol=1e-3)


def test_rmds_pp_matches_the_authors_code(p):
    """``evaluate_Relative_Mahalanobis_norm`` (and OpenOOD ``rmdsn``): the class-wise score minus the score under
    the Gaussian of all normalised training features."""
    u = normalised(p.X)
    means, precision = authors_class_gaussian(u, p.y, p.C)
    mean_global = u.mean(axis=0)
    prec_global = EmpiricalCovariance(assume_centered=True).fit(u - mean_global).precision_
    t = normalised(p.T[:-1])
    classwise = -np.stack([(((t - m) @ precision) * (t - m)).sum(-1) for m in means], 1).min(1)
    background = -(((t - mean_global) @ prec_global) * (t - mean_global)).sum(-1)
    close(ours(p, "rmds_pp")[:-1], classwise - background, rtol=1e-8, atol=1e-8)


def test_mahalanobis_pp_and_rmds_pp_equal_pytorch_ood_on_normalised_features(p):
    """pytorch-ood has neither, but its ``Mahalanobis`` and ``RMD`` fitted on normalised features are them, up to
    their scale: the inverse of the undivided scatter plus 1e-6 I, and Mahalanobis's half distance. The dead unit is
    left out (there the scatter is singular and their inverse huge where we take the pseudo-inverse)."""
    live = [i for i in range(p.L) if i != 3]
    train, test = torch.nn.functional.normalize(p.train[:, live]), torch.nn.functional.normalize(p.test[:-1, live])
    head = nn.Linear(len(live), p.C).double()
    stats = accumulate(p.train[:, live], p.labels, head)
    maha = build_scorer("mahalanobis_pp").fit_statistics(stats, head).score(p.test[:-1, live], None).numpy()
    theirs = pytorch_ood.Mahalanobis(None).fit_features(train.float(), p.labels).predict_features(test.float())
    close(maha, -2 * p.N * theirs.double().numpy(), rtol=2e-3, atol=1e-2)
    rmds = build_scorer("rmds_pp").fit_statistics(stats, head).score(p.test[:-1, live], None).numpy()
    theirs = pytorch_ood.RMD(None).fit_features(train.float(), p.labels).predict_features(test.float())
    close(rmds, -p.N * theirs.double().numpy(), rtol=2e-3, atol=1e-2)


def test_fit_on_features_accumulates_the_unit_gaussians(p):
    for name in ("mahalanobis_pp", "rmds_pp"):
        fitted = build_scorer(name).fit(p.train, p.labels, p.head).score(p.test, p.logits).numpy()
        close(fitted, ours(p, name), rtol=1e-10, atol=1e-10)


def test_mahalanobis_pp_without_its_statistics_says_so(p):
    stats = FeatureStatistics.from_features(p.train, p.labels, p.C, p.head)  # no unit_gaussians
    with pytest.raises(ConfigError, match="unit_gaussians"):
        build_scorer("mahalanobis_pp").fit_statistics(stats, p.head)


# ============================================================================================ device and dtype


@pytest.mark.parametrize("name", [*FEATURE_SCORERS, "mahalanobis_odin"])
def test_fitted_tensors_follow_the_scorer(p, name):
    """Every fitted tensor is a buffer: ``double()`` and ``to("meta")`` move them all (tests/test_device.py does so
    through a real test pass for every registered scorer)."""
    head = nn.Linear(p.L, p.C)  # float32, as a network's
    scorer = build_scorer(name).fit_statistics(p.stats, head)
    buffers = dict(scorer.named_buffers())
    assert {"terms.t2", "components", "class_terms.t2"} & set(buffers)  # the precision matrices and NECO's axes
    if name in FEATURE_SCORERS:
        float32 = scorer.score(p.test[:-1].float(), p.logits[:-1].float()).double()
        scorer.double()
        assert all(t.dtype == torch.float64 for t in scorer.buffers() if t.is_floating_point())
        torch.testing.assert_close(scorer.score(p.test[:-1], p.logits[:-1]), float32, rtol=1e-4, atol=1e-4)
    scorer.to("meta")
    assert all(t.device.type == "meta" for t in scorer.buffers())
