"""KNN, NNGuide and Relation (lightning_ood/scoring/neighbours.py) against numpy and pytorch-ood 0.4 on random
features with ties and zeros.
pytorch-ood 0.4's scores are outlier scores (higher = OOD): ours are their negatives, up to the factors each test
names."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from tests.scoring.conftest import close, energy, ours, theirs

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def unit(x):
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn(p, k):
    bank, query = unit(p.X), unit(p.T)
    distances = np.sqrt(((query[:, None, :] - bank[None, :, :]) ** 2).sum(-1))  # (M, N), small enough here
    expected = -np.sort(distances, axis=1)[:, k - 1]
    close(ours(p, "knn", k=k), expected, rtol=1e-4, atol=1e-5)
    reference = pytorch_ood.KNN(None, k=k).fit_features(p.train, p.labels).predict_features(p.test)
    close(ours(p, "knn", k=k), -theirs(reference), rtol=1e-4, atol=1e-5)  # pytorch-ood: + distance


def test_knn_chunks_give_the_same_answer(p, monkeypatch):
    import lightning_ood.scoring.neighbours as neighbours

    whole = ours(p, "knn", k=20)
    monkeypatch.setattr(neighbours, "CHUNK", 7)  # many chunks, uneven last one
    close(ours(p, "knn", k=20), whole, rtol=1e-6)


def test_nnguide(p):
    k = 10
    guided = unit(p.X) * energy(p.X @ p.W.T + p.b)[:, None]
    sims = unit(p.T) @ guided.T
    expected = np.sort(sims, axis=1)[:, -k:].mean(axis=1) * energy(p.T @ p.W.T + p.b)
    close(ours(p, "nnguide", k=k, fraction=1.0), expected, rtol=1e-4, atol=1e-5)
    reference = pytorch_ood.NNGuide(None, p.head, k=k).fit_features(p.train, p.labels).predict_features(p.test)
    close(ours(p, "nnguide", k=k, fraction=1.0), -theirs(reference), rtol=1e-4, atol=1e-5)
    # fraction 0.1: one training image in ten, evenly by index
    sub = guided[::10]
    expected = np.sort(unit(p.T) @ sub.T, axis=1)[:, -k:].mean(axis=1) * energy(p.T @ p.W.T + p.b)
    close(ours(p, "nnguide", k=k, fraction=0.1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("power", [1, 2])
def test_relation(p, power):
    def unit_eps(x):
        return x / np.sqrt((x**2).sum(1, keepdims=True) + 1e-10)

    r = np.maximum(unit_eps(p.T) @ unit_eps(p.X).T, 0) * (
        softmax(p.T @ p.W.T + p.b, 1) @ softmax(p.X @ p.W.T + p.b, 1).T
    )
    expected = np.where(r > 0.03, r**power, 0).sum(1)
    close(ours(p, "relation", power=power), expected, rtol=1e-4, atol=1e-5)
