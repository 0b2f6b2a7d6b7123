"""lightning_ood/statistics.py: the training-set statistics the scorers are fitted on, against numpy and sklearn
(class means, covariance, activation percentiles; batched accumulation; the bank's dtype)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

from lightning_ood.scoring import build_scorer
from lightning_ood.statistics import FeatureStatistics, StatisticsAccumulator, percentile
from tests.references import ref_class_means


@pytest.mark.numerics
def test_feature_statistics_against_numpy(prob):
    stats = FeatureStatistics.from_features(prob.train, prob.labels, prob.num_classes)
    x, y = prob.train64, prob.labels64
    np.testing.assert_array_equal(stats.counts.numpy(), [sum(y == c) for c in range(prob.num_classes)])
    np.testing.assert_allclose(stats.class_means.numpy(), ref_class_means(x, y, prob.num_classes), rtol=1e-12)
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std.numpy(), x.std(0, ddof=0), rtol=1e-10)
    centred = np.concatenate([x[y == c] - x[y == c].mean(0) for c in range(prob.num_classes)])
    cov = EmpiricalCovariance(assume_centered=False).fit(centred).covariance_
    np.testing.assert_allclose(stats.covariance.numpy(), cov, rtol=1e-9, atol=1e-12)
    assert stats.num_classes == prob.num_classes and stats.feature_dim == x.shape[1] and stats.num_samples == len(x)


@pytest.mark.numerics
@pytest.mark.parametrize("q", [0, 0.1, 10, 33.3, 50, 72.5, 90, 99.9, 100])
def test_activation_percentile_is_numpy_percentile(prob, q):
    stats = FeatureStatistics.from_features(prob.train, prob.labels)
    flat32 = prob.train.numpy().ravel()
    assert stats.activation_percentile(q) == pytest.approx(np.percentile(flat32.astype(np.float64), q), rel=1e-12)
    assert stats.activation_percentile(q) == pytest.approx(float(np.percentile(flat32, q)), rel=1e-6)


@pytest.mark.numerics
def test_activation_percentile_off_grid_or_out_of_range(prob):
    stats = FeatureStatistics.from_features(prob.train, prob.labels)
    for bad in (0.05, 90.01, 101, -1):
        with pytest.raises(ValueError, match="percentile"):
            stats.activation_percentile(bad)


@pytest.mark.numerics
def test_activation_percentile_of_float64_features_is_exact():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.gamma(2.0, 1.0, (50, 7)))  # float64
    stats = FeatureStatistics.from_features(features, torch.arange(50) % 3)
    for q in (10, 33.3, 90):
        assert stats.activation_percentile(q) == pytest.approx(np.percentile(features.numpy().ravel(), q), rel=1e-12)


@pytest.mark.numerics
def test_statistics_need_every_class():
    features = torch.rand(6, 3)
    with pytest.raises(ValueError, match=r"classes \[3\] have no training images"):
        FeatureStatistics.from_features(features, torch.tensor([0, 1, 2, 0, 1, 2]), num_classes=4)
    with pytest.raises(ValueError, match="labels"):
        FeatureStatistics.from_features(features, torch.tensor([0, 1, 2, 0, 1, 5]), num_classes=4)


@pytest.mark.numerics
def test_batched_accumulation_equals_one_batch():
    rng = np.random.default_rng(9)
    features = torch.from_numpy(np.maximum(rng.normal(0.5, 1, (203, 9)), 0)).double()
    labels = torch.from_numpy(rng.integers(0, 5, 203))
    labels[:5] = torch.arange(5)
    one = StatisticsAccumulator(5, 9)
    one.update(features, labels)
    expected = one.compute()
    many = StatisticsAccumulator(5, 9)
    for rows in np.array_split(rng.permutation(203), [1, 17, 18, 90, 150]):
        many.update(features[rows], labels[rows])
    result = many.compute()
    for key, value in expected.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(result.state_dict()[key], value, rtol=1e-10, atol=1e-10, msg=key)
    assert torch.equal(result.activation_quantiles, expected.activation_quantiles)


@pytest.mark.numerics
def test_quantile_stride_keeps_every_strided_index():
    rng = np.random.default_rng(10)
    features = torch.from_numpy(rng.gamma(2.0, 1.0, (100, 6)).astype(np.float32))
    labels = torch.from_numpy(np.arange(100) % 3)
    indices = torch.from_numpy(rng.permutation(100) + 1000)  # dataset indices, not positions
    acc = StatisticsAccumulator(3, 6, quantile_stride=3)
    for rows in np.array_split(np.arange(100), 7):
        acc.update(features[rows], labels[rows], indices[rows])
    stats = acc.compute()
    kept = features[indices % 3 == 0].double().numpy().ravel()
    assert len(kept) == 6 * int((indices % 3 == 0).sum()) < 6 * 100
    for q in (0, 12.3, 50, 90, 100):
        assert stats.activation_percentile(q) == pytest.approx(np.percentile(kept, q), rel=1e-12)
    # Means still use every sample.
    np.testing.assert_allclose(stats.mean.numpy(), features.double().numpy().mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="indices"):
        acc.update(features, labels)


@pytest.mark.numerics
def test_percentile_matches_numpy_exactly():
    rng = np.random.default_rng(12)
    for case in range(400):
        ndim = rng.integers(1, 4)
        shape = tuple(int(s) for s in rng.integers(1, 9, ndim))
        x = rng.normal(0, 3, shape).astype(np.float32)
        if case % 3 == 0:
            x = np.round(x).astype(np.float32)  # ties
        dim = None if case % 2 else int(rng.integers(0, ndim))
        q = float(rng.choice([0.0, 100.0, 50.0, 90.0, 10.0, round(float(rng.uniform(0, 100)), 1), rng.uniform(0, 100)]))
        expected = np.percentile(x, q, axis=dim)
        actual = percentile(torch.from_numpy(x), q, dim).numpy()
        assert actual.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(actual, expected, err_msg=f"shape {shape} dim {dim} q {q!r}")
        x64 = x.astype(np.float64) * 1.1
        np.testing.assert_array_equal(
            percentile(torch.from_numpy(x64), q, dim).numpy(), np.percentile(x64, q, axis=dim)
        )


@pytest.mark.numerics
def test_percentile_with_several_p():
    rng = np.random.default_rng(13)
    x = rng.normal(0, 1, (4, 11)).astype(np.float32)
    qs = [0.0, 7.5, 33.3, 50.0, 90.0, 100.0]
    flat = percentile(torch.from_numpy(x), torch.tensor(qs, dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(flat, [np.percentile(x, q) for q in qs])
    rows = percentile(torch.from_numpy(x), torch.tensor(qs, dtype=torch.float64), dim=1).numpy()  # (4, len(qs))
    np.testing.assert_array_equal(rows, np.stack([np.percentile(x, q, axis=1) for q in qs], axis=1))
    with pytest.raises(ValueError, match="empty"):
        percentile(torch.empty(0), 50.0)


def test_the_bank_keeps_features_beyond_float16_range_in_float32(p):
    """float16 holds the bank of an ordinary network (half the bytes); features above 65,504 (an untrained DenseNet
    reaches 4e5) would become inf there, and KNN / OpenMax NaN: that bank stays float32 and its scores finite."""
    assert p.stats.bank.dtype == torch.float16
    big = p.train * 1e5
    stats = FeatureStatistics.from_features(big, p.labels, p.C, p.head)
    assert stats.bank.dtype == torch.float32 and torch.equal(stats.bank, big)
    for name in ("knn", "openmax"):
        scorer = build_scorer(name).fit_statistics(stats, p.head)
        test = p.test * 1e5
        assert torch.isfinite(scorer.score(test, p.head(test))).all(), name
