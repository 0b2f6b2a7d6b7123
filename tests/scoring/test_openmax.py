"""OpenMax (lightning_ood/scoring/openmax.py) against pytorch-ood 0.4's ``OpenMax``."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_ood.scoring import build_scorer
from lightning_ood.statistics import FeatureStatistics
from tests.scoring.conftest import close, theirs

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def test_openmax_matches_pytorch_ood(p):
    right = (p.train_logits.argmax(1) == p.labels).numpy()
    stats = FeatureStatistics.from_features(p.train[right], p.labels[right], p.C, p.head)  # every image correct
    scorer = build_scorer("openmax", tail=20, alpha=3).fit_statistics(stats, p.head)
    reference = pytorch_ood.OpenMax(None, tailsize=20, alpha=3, euclid_weight=1.0)
    reference.fit_logits(p.train_logits[right], p.labels[right])
    # the Weibull fits are numerical maximum-likelihood optimisations (ours on float64 logits): agreement to ~1e-3
    # ours scores -log p(unknown), the same order as the authors' -p(unknown)
    unknown = np.exp(-scorer.score(p.test, p.logits).double().numpy())
    close(-unknown, -theirs(reference.predict_logits(p.logits)), 5e-3, 1e-4)
