"""LTS (Djurisic, Liu & Nikolic, MVA 2025; lightning_ood/scoring/lts.py) against a numpy computation written from
the authors' code (andrijazz/lts) and pytorch-ood 0.4's ``LTS``, on random features with ties and zeros; and the
fitted tensors of LTS, pNML, VRA and the head GradUncertainty follow ``double()`` and ``to('meta')``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.lts import logit_scale
from tests.scoring.conftest import close, ours, theirs, toy_problem_with_unit_statistics

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_with_unit_statistics``."""
    return toy_problem_with_unit_statistics()


# ============================================================================================ LTS


def lts_reference(features: np.ndarray, logits: np.ndarray, percentile: float) -> np.ndarray:
    """andrijazz/lts ``lts.py`` lines 61-72 (the factor) and ``ood_eval.py`` (energy of ``logits * s``)."""
    x = np.maximum(features, 0)
    n = x.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    s2 = -np.sort(-x, axis=1)[:, :k].sum(axis=1)
    with np.errstate(invalid="ignore"):
        s = (x.sum(axis=1) / s2)[:, None] ** 2
    return logsumexp(logits * s, axis=1)


@pytest.mark.parametrize("percentile", [65, 90, 95])
def test_lts_follows_the_authors_code(p, percentile):
    expected = lts_reference(p.T, p.logits.double().numpy(), percentile)
    scores = ours(p, "lts", percentile=percentile)
    close(scores[:-1], expected[:-1])
    # an all-zero feature: the authors divide 0 by 0; here the factor is 1, the energy of the head's bias
    assert np.isnan(expected[-1])
    close(scores[-1], logsumexp(p.b))


@pytest.mark.parametrize("percentile", [65, 95])
def test_lts_agrees_with_pytorch_ood(p, percentile):
    """pytorch-ood's ``p`` is the kept fraction (0.05 for the authors' 95), its all-zero feature is NaN too."""
    reference = pytorch_ood.LTS(None, p.head, p=round(1 - percentile / 100, 10)).predict_features(p.test)
    close(ours(p, "lts", percentile=percentile)[:-1], -theirs(reference)[:-1])


def test_lts_scales_with_the_activation_spread():
    """Two features with the same logits: the one whose mass is spread over more units gets the larger factor."""
    peaked, spread = torch.tensor([[4.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(logit_scale(peaked, 50), torch.tensor([[1.0]]))
    torch.testing.assert_close(logit_scale(spread, 50), torch.tensor([[4.0]]))  # (4 / 2)^2


# ============================================================================================ device and dtype


@pytest.mark.parametrize("name", ["lts", "pnml", "vra", "vra_plusplus", "graduncertainty_head"])
def test_fitted_tensors_follow_double_and_meta(p, name):
    scorer = build_scorer(name).fit_statistics(p.stats, p.head)
    fitted = dict(scorer.named_buffers())
    assert name in ("lts", "graduncertainty_head") or {"alpha", "beta"} <= set(fitted) or "projector" in fitted
    scorer.double()
    assert all(t.dtype == torch.float64 for t in scorer.buffers() if t.is_floating_point())
    close(scorer.score(p.test.double(), p.logits.double()).numpy(), ours(p, name), rtol=1e-4, atol=1e-4)
    scorer.to("meta")
    assert all(t.device.type == "meta" for t in scorer.buffers())
