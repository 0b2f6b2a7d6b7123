"""MSP, Energy and MaxLogit (lightning_ood/scoring/output.py) against numpy (explicit loops) and pytorch-ood 0.4."""

from __future__ import annotations

import numpy as np
import pytest

from tests.scoring.conftest import assert_scores, close, ours, score_with, theirs
from tests.scoring.references import ref_logsumexp, ref_msp

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


@pytest.mark.numerics
def test_msp_energy_maxlogit(prob):
    logits64 = prob.logits.double().numpy()
    assert_scores(score_with("msp", prob), ref_msp(logits64))
    assert_scores(score_with("energy", prob), ref_logsumexp(logits64))
    assert_scores(score_with("energy", prob, temperature=2.0), 2.0 * ref_logsumexp(logits64 / 2.0))
    assert_scores(score_with("maxlogit", prob), np.array([max(row) for row in logits64]))


def test_logit_baselines_agree_with_pytorch_ood(p):
    """MSP, Energy (T = 1 and 2) and MaxLogit against pytorch-ood's, which return outlier scores (higher = OOD)."""
    # msp scores log p_max (the same order, no ties at p = 1.0): its exponential is pytorch-ood's probability
    close(np.exp(ours(p, "msp")), -theirs(pytorch_ood.MaxSoftmax.score(p.logits)))
    close(ours(p, "energy"), -theirs(pytorch_ood.EnergyBased.score(p.logits)))
    close(ours(p, "energy", temperature=2.0), -theirs(pytorch_ood.EnergyBased.score(p.logits, t=2.0)))
    close(ours(p, "maxlogit"), -theirs(pytorch_ood.MaxLogit.score(p.logits)))
