"""CF-OOD (Angiulli et al., SISAP 2025; lightning_ood/scoring/cfood.py) against OpenOOD's ``CFOODPostprocessor``,
which its authors contributed, re-implemented here, on random features with ties and zeros (pytorch-ood 0.4 has
no CF-OOD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ood.errors import ConfigError, FitError
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.cfood import kappa_grid
from lightning_ood.statistics import FeatureStatistics
from tests.scoring.conftest import fitted64, in_float64, toy_problem_in_the_bank
from tests.scoring.conftest import fitted_on_statistics as fitted


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_in_the_bank``."""
    return toy_problem_in_the_bank()


def cfood_reference(train, test, alpha, k, seed=0):
    """OpenOOD's ``CFOODPostprocessor`` (cfood_postprocessor.py lines 94-178), float64 features, the reference set
    drawn with our seeded permutation (theirs is unseeded)."""
    feats = train / (torch.norm(train, dim=1, keepdim=True) + 1e-10)
    total = feats.size(0)
    n = int(alpha * total) if alpha < 1.0 else total
    ref = feats[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]] if alpha < 1.0 else feats
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knndst = torch.zeros((n, len(kpos)), dtype=train.dtype)
    for i in range(n):
        knndst[i, :] = torch.sort(torch.sum((ref[i] - ref) ** 2, dim=1)).values[kpos + 1]
    scores = []
    for v in test / (torch.norm(test, dim=1, keepdim=True) + 1e-10):
        dst = torch.sum((v - ref) ** 2, dim=1)
        count = (knndst >= dst.view(n, 1)).sum(dim=0).float() / float(n)
        pos = torch.nonzero(count >= k, as_tuple=False)
        scores.append(kval[pos[0, 0]] if pos.numel() > 0 else 1.0)
    return -np.array(scores)


@pytest.mark.parametrize(("alpha", "k"), [(0.1, 0.01), (0.5, 0.05), (1.0, 0.001), (1.0, 0.3)])
def test_cfood_matches_the_authors_postprocessor(p, alpha, k):
    scores = in_float64(fitted64(p, "cfood", alpha=alpha, k=k), p.test, p.head)
    np.testing.assert_array_equal(scores, cfood_reference(p.train.double(), p.test.double(), alpha, k))
    assert len(np.unique(scores)) > 3  # a coarse score, but not a constant one


def test_cfood_scores_in_chunks_and_float32_as_a_whole(p, monkeypatch):
    import lightning_ood.scoring.cfood as cfood

    whole = fitted(p, "cfood", alpha=1.0).score(p.test, p.head(p.test))
    monkeypatch.setattr(cfood, "CHUNK", 7)
    chunked = fitted(p, "cfood", alpha=1.0).score(p.test, p.head(p.test))
    torch.testing.assert_close(chunked, whole)
    # float32 through and through (theirs computes in float32): the same kappa, rounded to float32
    np.testing.assert_allclose(whole.double().numpy(), cfood_reference(p.train, p.test, 1.0, 0.01), rtol=1e-7)


def test_cfood_grid_and_guards():
    shares, ranks = kappa_grid(40)
    assert ranks[0] == 0 and (np.diff(ranks) > 0).all() and ranks[-1] + 1 <= 39 and len(shares) == len(ranks)
    assert len(kappa_grid(100_000)[0]) == 230
    for bad in ({"alpha": 0.0}, {"k": 1.5}, {"alpha": "x"}):
        with pytest.raises(ConfigError):
            build_scorer("cfood", **bad)
    head = nn.Linear(4, 2)
    stats = FeatureStatistics.from_features(torch.rand(10, 4), torch.arange(10) % 2, 2, head)
    with pytest.raises(FitError, match="at least 2"):
        build_scorer("cfood").fit_statistics(stats, head)  # 10% of 10 features is 1
