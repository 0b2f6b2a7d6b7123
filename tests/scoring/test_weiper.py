"""WeiPer and WeiPer+KLD (Granz et al., NeurIPS 2024; lightning_ood/scoring/weiper.py) against numpy computations
written from the authors' code (mgranz/weiper_icml ``weiper_kldiv/utils.py`` and
``weiper_kldiv_postprocessor.py``); at ``delta = 0`` WeiPer is pytorch-ood 0.4's MSP, which implements neither.
The contract of WeiPer, CARef, CADRef and ORA: their fitted tensors follow the dtype and the device, ``fit``
on features equals the statistics' fit, bad hyperparameters are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from torch import nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.weiper import smooth
from tests.scoring.conftest import ours, toy_problem_with_a_float64_head

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_with_a_float64_head``."""
    return toy_problem_with_a_float64_head()


def close(a, b, rtol=1e-9, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


# ============================================================================================ WeiPer


def perturbed_head(p, delta, repeats, seed=0):
    """The perturbed head as ``calculate_weiper_space`` builds it: per copy a normal (C, L) draw (our seeded
    protocol: a CPU generator, one float32 draw per copy), its rows normalised, times delta and the rows' norms,
    added to W; the copies stacked, the bias repeated."""
    g = torch.Generator().manual_seed(seed)
    norms = np.linalg.norm(p.W, axis=1, keepdims=True)
    copies = []
    for _ in range(repeats):
        e = torch.randn(p.C, p.L, generator=g).double().numpy()
        copies.append(p.W + delta * norms * e / np.linalg.norm(e, axis=1, keepdims=True))
    return np.concatenate(copies), np.tile(p.b, repeats)


def weiper_msp(z, repeats):  # calculate_weiper_pred: the MSP of each copy's C logits, averaged
    return np.mean([softmax(block, axis=1).max(1) for block in np.split(z, repeats, axis=1)], axis=0)


@pytest.mark.parametrize(("delta", "repeats"), [(1.8, 1), (2.4, 9), (0.5, 20)])
def test_weiper_msp(p, delta, repeats):
    w, b = perturbed_head(p, delta, repeats)
    # weiper scores -log(1 - mean MSP): the same order; back to the authors' mean MSP
    close(1 - np.exp(-ours(p, "weiper", delta=delta, repeats=repeats)), weiper_msp(p.T @ w.T + b, repeats))


def test_weiper_perturbs_each_class_projection_by_delta_times_its_norm(p):
    scorer = build_scorer("weiper", delta=2.0, repeats=4).fit_statistics(p.stats, p.head)
    shift = scorer.perturbed_weight.unflatten(0, (4, p.C)) - p.head.weight.detach()  # (4, C, L)
    close(shift.norm(dim=2).numpy(), 2.0 * np.tile(np.linalg.norm(p.W, axis=1), (4, 1)))
    close(scorer.perturbed_bias.numpy(), np.tile(p.b, 4))


def test_weiper_is_seeded(p):
    first, again = ours(p, "weiper", repeats=5), ours(p, "weiper", repeats=5)
    np.testing.assert_array_equal(first, again)  # the same on every run (and every DDP process)
    assert not np.allclose(first, ours(p, "weiper", repeats=5, seed=1))


def test_weiper_without_perturbation_is_pytorch_ood_msp(p):
    reference = pytorch_ood.MaxSoftmax.score(p.logits)
    close(1 - np.exp(-ours(p, "weiper", delta=0.0, repeats=3)), -reference.double().numpy(), rtol=1e-6)  # float32


# ============================================================================================ WeiPer+KLD


def densities(values, low, high, bins):
    """``calculate_density``: per sample (row), the share of its values in each of ``bins`` bins ``[e_k, e_k+1)``
    from ``low`` to ``high + 1e-8``; values outside fall in the dropped outer bins."""
    edges = low + np.arange(bins + 1) / bins * (high + 1e-8 - low)
    index = np.searchsorted(edges, values, side="right")  # edges[i - 1] <= v < edges[i]
    counts = np.stack([(index == k + 1).sum(axis=1) for k in range(bins)], axis=1)
    return counts / values.shape[1]


def uniform_smoothing(q, size):  # UniformKernel: Conv1d(size, padding="same", padding_mode="replicate")
    before = (size - 1) // 2
    padded = np.pad(q, ((0, 0), (before, size - 1 - before)), mode="edge")
    return np.stack([np.convolve(row, np.ones(size) / size, mode="valid") for row in padded])


def kl_both_ways(p, q, eps):  # kldiv(symmetric=True): p is the training mean, q the sample's smoothed density
    p = (p + eps) / (p + eps).sum()
    q = (q + eps) / (q + eps).sum(axis=1, keepdims=True)
    return (p * np.log(p / q)).sum(1) + (q * np.log(q / p)).sum(1)


def weiper_kld_reference(p, delta, repeats, bins, s1, s2, lambda_1, lambda_2):
    """``calculate_WeiPerKLDiv_score`` after the postprocessor's ``setup`` with ``exact_minmax``: the ranges are the
    training features' and perturbed logits' extremes, the training density the mean of the per-image densities."""
    w, b = perturbed_head(p, delta, repeats)
    train_z, test_z = p.X @ w.T + b, p.T @ w.T + b
    x_range, z_range = (p.X.min(), p.X.max()), (train_z.min(), train_z.max())
    train_density = densities(p.X, *x_range, bins).mean(0)
    train_z_density = densities(train_z, *z_range, bins).mean(0)
    kl = kl_both_ways(train_density, uniform_smoothing(densities(p.T, *x_range, bins), s1), 0.01)
    kl_z = kl_both_ways(train_z_density, uniform_smoothing(densities(test_z, *z_range, bins), s2), 0.025)
    return -(kl + lambda_1 * kl_z - lambda_2 * weiper_msp(test_z, repeats))


@pytest.mark.parametrize(
    ("delta", "repeats", "bins", "s1", "s2", "lambda_1", "lambda_2"),
    [(1.8, 10, 100, 4, 15, 2.5, 0.1), (2.4, 3, 60, 40, 25, 0.1, 1.0), (2.0, 7, 20, 5, 40, 4.0, 5.0)],
)
def test_weiper_kld(p, delta, repeats, bins, s1, s2, lambda_1, lambda_2):
    kwargs = dict(delta=delta, repeats=repeats, bins=bins, smoothing=s1, smoothing_perturbed=s2, lambda_1=lambda_1,
                  lambda_2=lambda_2)  # fmt: skip
    expected = weiper_kld_reference(p, delta, repeats, bins, s1, s2, lambda_1, lambda_2)
    close(ours(p, "weiper_kld", **kwargs), expected)


def test_weiper_kld_blocks_give_the_same_answer(p, monkeypatch):
    import lightning_ood.scoring.weiper as weiper

    whole = ours(p, "weiper_kld", repeats=6, bins=30)
    monkeypatch.setattr(weiper, "CHUNK_VALUES", 7 * 6 * p.C)  # blocks of 7 rows, an uneven last one
    close(ours(p, "weiper_kld", repeats=6, bins=30), whole, rtol=1e-12)


@pytest.mark.parametrize("size", [1, 4, 5, 15, 40])
def test_smoothing_is_the_authors_replicate_padded_conv1d(size):
    """Our moving average against the authors' kernel: a depthwise ``Conv1d(padding="same",
    padding_mode="replicate")`` with weights 1 / size (an even size puts the extra bin after)."""
    q = torch.rand(6, 50, dtype=torch.float64)
    conv = nn.Conv1d(6, 6, size, padding="same", padding_mode="replicate", groups=6, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0 / size)
        expected = conv(q)
    torch.testing.assert_close(smooth(q, size), expected)
    close(smooth(q, size).numpy(), uniform_smoothing(q.numpy(), size))


# ============================================================================================ contract


@pytest.mark.parametrize("name", ["weiper", "weiper_kld", "caref", "cadref", "ora"])
def test_fitted_tensors_follow_dtype_and_device(p, name):
    head = nn.Linear(p.L, p.C)  # float32
    with torch.no_grad():
        head.weight.copy_(p.head.weight)
        head.bias.copy_(p.head.bias)
    scorer = build_scorer(name, **({"repeats": 4} if "weiper" in name else {})).fit_statistics(p.stats, head)
    floats = [t for t in scorer.buffers() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    scorer.double()
    assert all(t.dtype == torch.float64 for t in scorer.buffers() if t.is_floating_point())
    with torch.no_grad():
        scores = scorer.score(p.test, head.double()(p.test))
    assert scores.dtype == torch.float64 and torch.isfinite(scores).all()
    scorer.to("meta")
    assert all(t.device.type == "meta" for t in scorer.buffers())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("weiper", {"repeats": 0}), ("weiper", {"delta": -1}), ("weiper_kld", {"bins": 0}),
     ("weiper_kld", {"lambda_1": -1}), ("cadref", {"logit_score": "odin"})],
)  # fmt: skip
def test_bad_hyperparameters_are_refused(name, kwargs):
    with pytest.raises(ConfigError):
        build_scorer(name, **kwargs)


@pytest.mark.parametrize("name", ["weiper", "weiper_kld", "caref", "cadref", "ora"])
def test_fit_on_features_equals_fit_on_the_statistics(p, name):
    """``fit(features, labels, head)`` (the cached-feature path, bench-score's) accumulates what the scorer needs."""
    kwargs = {"repeats": 4} if "weiper" in name else {}
    direct = build_scorer(name, **kwargs).fit(p.train, p.labels, p.head).score(p.test, p.logits)
    close(direct.numpy(), ours(p, name, **kwargs))
