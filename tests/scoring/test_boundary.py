"""SHE, fDBD and NCI (lightning_ood/scoring/boundary.py) against numpy and pytorch-ood 0.4 on random features with
ties and zeros.
pytorch-ood 0.4's scores are outlier scores (higher = OOD): ours are their negatives, up to the factors each test
names."""

from __future__ import annotations

import numpy as np
import pytest

from tests.scoring.conftest import close, ours, theirs

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def test_she_fdbd_nci(p):
    predicted_train = (p.X @ p.W.T + p.b).argmax(1)
    patterns = np.stack([p.X[(p.y == c) & (predicted_train == c)].mean(0) for c in range(p.C)])
    z = p.T @ p.W.T + p.b
    pred = z.argmax(1)
    close(ours(p, "she"), (p.T * patterns[pred]).sum(1), rtol=1e-5)
    she = pytorch_ood.SHE(None, p.head).fit_features(p.train, p.labels)
    close(ours(p, "she"), -theirs(she.predict_features(p.test)), rtol=1e-5)
    mu = p.X.mean(0)
    boundary = np.array([np.mean([abs(z[i, pred[i]] - z[i, c]) / np.linalg.norm(p.W[pred[i]] - p.W[c])
                                  for c in range(p.C) if c != pred[i]]) for i in range(len(z))])  # fmt: skip
    close(ours(p, "fdbd"), boundary / np.linalg.norm(p.T - mu, axis=1), rtol=1e-5)
    close(ours(p, "fdbd", normalizer="norm"), boundary / np.linalg.norm(p.T, axis=1), rtol=1e-5)
    close(ours(p, "fdbd"), -theirs(pytorch_ood.fDBD(None, p.head).fit_features(p.train).predict_features(p.test)),
          rtol=1e-5)  # fmt: skip
    alpha = 0.01
    centred = p.T - mu
    expected = (p.W[pred] * centred).sum(1) / np.linalg.norm(centred, axis=1) + alpha * np.abs(p.T).sum(1)
    close(ours(p, "nci", alpha=alpha), expected, rtol=1e-5)
    reference = pytorch_ood.NCI(None, p.head, alpha=alpha).fit_features(p.train).predict_features(p.test)
    close(ours(p, "nci", alpha=alpha), -theirs(reference), rtol=1e-5)
