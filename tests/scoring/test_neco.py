"""NECO (Ben Ammar et al., ICLR 2024; lightning_ood/scoring/neco.py) against the authors' code (gitlab.com/drti/neco
``ood_methods.py``, re-implemented here with sklearn) on random features with ties and zeros; pytorch-ood 0.4 has
no NECO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from torch import nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from tests.scoring.conftest import accumulate, ours, toy_problem_in_float64

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_in_float64``."""
    return toy_problem_in_float64()


def close(a, b, rtol=1e-7, atol=1e-9):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def authors_neco(p, dim: int, architecture: str) -> np.ndarray:
    """gitlab.com/drti/neco ``ood_methods.py`` ``neco``: StandardScaler, PCA of every component, the first
    ``neco_dim`` of the projection over the full (standardised; raw for deit/swin) vector, times the max logit except
    for ``resnet``."""
    ss = StandardScaler()
    train = ss.fit_transform(p.X)
    test = ss.transform(p.T[:-1])
    pca = PCA(p.X.shape[1]).fit(train)
    reduced = pca.transform(test)[:, :dim]
    whole = p.T[:-1] if architecture in ("deit", "swin") else test
    score = np.linalg.norm(reduced, axis=1) / np.linalg.norm(whole, axis=1)
    return score if architecture == "resnet" else score * p.Z[:-1].max(axis=-1)


@pytest.mark.parametrize("dim", [1, 4, 7, 12])
@pytest.mark.parametrize("variant", ["resnet", "vit", "swin"])
def test_neco_matches_the_authors_code(p, dim, variant):
    """pytorch-ood 0.4 has no NECO: the authors' code is the only reference. The dead unit is constant: scale 1 in
    both (sklearn's ``StandardScaler`` keeps constant units)."""
    mine = ours(p, "neco", dim=dim, variant=variant)
    close(mine[:-1], authors_neco(p, dim, variant), rtol=1e-8, atol=1e-10)
    assert np.isfinite(mine[-1])  # the zero row (0 / 0 there)
    if dim == p.L and variant == "resnet":
        close(mine[:-1], 1.0)  # every direction kept: the whole norm


def test_neco_without_standardisation_would_differ(p):
    """The standardisation is the authors': PCA on the raw features gives other scores (the test above would fail)."""
    centred = p.X - p.X.mean(0)
    top = np.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :4]
    t = p.T[:-1] - p.X.mean(0)
    raw = np.linalg.norm(t @ top, axis=1) / np.linalg.norm(t, axis=1)
    assert not np.allclose(ours(p, "neco", dim=4)[:-1], raw, rtol=1e-3)


def test_neco_defaults_and_bad_arguments(p):
    assert build_scorer("neco").fit_statistics(p.stats, p.head).components.shape == (p.L, p.L // 2)  # 12-d: half
    wide = accumulate(torch.rand(240, 200, dtype=torch.float64), torch.arange(240) % 3, nn.Linear(200, 3).double())
    assert build_scorer("neco").fit_statistics(wide, nn.Linear(200, 3).double()).components.shape == (200, 100)
    with pytest.raises(ConfigError, match="dim"):
        build_scorer("neco", dim=13).fit_statistics(p.stats, p.head)
    with pytest.raises(ConfigError, match="variant"):
        build_scorer("neco", variant="vgg")
    with pytest.raises(ConfigError, match="dim"):
        build_scorer("neco", dim=0)
