"""ViM and Residual (lightning_ood/scoring/subspace.py) against numpy and pytorch-ood 0.4's ``ViM``, and as their
authors compute them: haoqiwang/vim ``benchmark.py`` (its principal-dimension rule,
``EmpiricalCovariance(assume_centered=True)`` around ``u = -pinv(W) b``, alpha from the training features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.subspace import default_dim
from lightning_ood.statistics import FeatureStatistics
from tests.scoring.conftest import close, energy, ours, theirs

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def vim_reference(p, dim):
    u = -np.linalg.pinv(p.W) @ p.b
    centred = p.X - u
    values, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
    ns = vectors[:, np.argsort(values)[::-1][dim:]]
    residual = np.linalg.norm((p.T - u) @ ns, axis=1)
    alpha = (p.X @ p.W.T + p.b).max(1).mean() / np.linalg.norm(centred @ ns, axis=1).mean()
    return energy(p.T @ p.W.T + p.b) - alpha * residual, -residual


@pytest.mark.parametrize("dim", [3, 6])
def test_vim_and_residual(p, dim):
    vim, residual = vim_reference(p, dim)
    close(ours(p, "vim", dim=dim), vim, rtol=1e-4, atol=1e-4)
    close(ours(p, "residual", dim=dim), residual, rtol=1e-4, atol=1e-4)
    reference = pytorch_ood.ViM(None, d=dim, w=p.head.weight.detach(), b=p.head.bias.detach())
    reference.fit_features(p.train, p.labels)
    close(ours(p, "vim", dim=dim), -theirs(reference.predict_features(p.test)), rtol=1e-4, atol=1e-4)


def test_vim_default_dimension_and_bad_dimension(p):
    from lightning_ood.errors import ConfigError
    from lightning_ood.scoring.subspace import default_dim

    assert (default_dim(2048), default_dim(768), default_dim(512), default_dim(342)) == (1000, 512, 256, 171)
    with pytest.raises(ConfigError, match="principal dimension must be in"):
        ours(p, "vim", dim=p.L)


def authors_dim(feature_dim: int) -> int:
    """benchmark.py: 1000 from 2048-d features, 512 from 768-d, half the features below."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def test_vim_principal_dimension_follows_the_authors_rule():
    for dim in (2048, 4096, 1280, 1024, 800, 768, 767, 512, 342, 64):
        assert default_dim(dim) == authors_dim(dim), dim
    assert default_dim(1280) == 512  # MobileNetV2 (the old rule gave 1000)


def test_vim_and_residual_at_the_default_dimension_match_the_authors_computation():
    """800-d features (the rule's 768-2047 branch, MobileNetV2's 1280 included): D = 512 (the old rule: 400)."""
    rng = np.random.default_rng(0)
    n, dim, classes = 1200, 800, 6
    spectrum = 1.0 / (1.0 + np.arange(dim) / 40.0)  # distinct principal directions around D
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    train = np.maximum(rng.normal(size=(n, dim)) * spectrum @ basis.T + 0.3, 0)
    train = torch.tensor(train).half().float()  # the bank stores float16: the same features on both sides
    test = torch.tensor(np.maximum(rng.normal(size=(40, dim)) * 1.5 @ basis.T + 0.3, 0)).float()
    head = nn.Linear(dim, classes)
    labels = torch.arange(n) % classes
    stats = FeatureStatistics.from_features(train, labels, classes, head)
    with torch.no_grad():
        test_logits = head(test)
    vim = build_scorer("vim").fit_statistics(stats, head).score(test, test_logits).double().numpy()
    residual = build_scorer("residual").fit_statistics(stats, head).score(test, test_logits).double().numpy()

    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    x, t = train.double().numpy(), test.double().numpy()
    u = -np.linalg.pinv(w) @ b
    covariance = (x - u).T @ (x - u) / n  # EmpiricalCovariance(assume_centered=True).fit(x - u)
    values, vectors = np.linalg.eigh(covariance)  # their np.linalg.eig of a symmetric matrix: the same eigenpairs
    ns = vectors[:, np.argsort(-values)[authors_dim(dim) :]]
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((x - u) @ ns, axis=1).mean()
    vlogit = np.linalg.norm((t - u) @ ns, axis=1)
    close(vim, logsumexp(t @ w.T + b, axis=1) - alpha * vlogit, rtol=1e-4, atol=1e-4)
    close(residual, -vlogit, rtol=1e-4, atol=1e-4)
