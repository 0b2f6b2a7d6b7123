"""Gram (Sastry & Oore, ICML 2020; lightning_ood/scoring/gram.py): the Gram features, their bounds and the
normaliser against numpy on every block of a random ResNet-20."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ood.hooks import block_outputs
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.gram import GramBounds, gram_features
from lightning_ood.statistics import LogitStatistics
from tests.scoring.conftest import close


def test_gram_statistics_and_score(network):
    """Bounds, held-out normaliser and score against numpy on the Gram features of every block."""
    from lightning_ood.data.base import IndexedDataset
    from lightning_ood.fitting import FitInputs, compute_feature_statistics
    from lightning_ood.scoring.gram import GRAM_HOLDOUT

    torch.manual_seed(1)
    images = torch.randn(120, 3, 32, 32)
    labels = torch.arange(120) % 4
    inputs = FitInputs(network.net, "test", frozenset({GramBounds, LogitStatistics}))
    loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(images, labels)), batch_size=32)
    stats = compute_feature_statistics(inputs, loader, progress=False, log=False)
    blocks = list(network.net.blocks())
    captured = {}
    probe = torch.cat([images[:3], images[3:6] * 3])  # three training images, three far from them
    with torch.no_grad(), block_outputs(network.net, blocks) as out:
        predicted = network.net(images).argmax(1).numpy()
        captured = {name: out[name].double().numpy() for name in blocks}
        probe_predicted = network.net(probe).argmax(1).numpy()
        probed = {name: out[name].clone() for name in blocks}
    held = np.arange(120) % GRAM_HOLDOUT == 0

    def gram(m):  # (N, C, H, W) -> (N, P, C): row sums of (x^p)(x^p)^T, signed p-th root
        x = m.reshape(len(m), m.shape[1], -1)
        out = []
        for power in range(1, 11):
            a = x**power
            g = np.einsum("ncs,nds->ncd", a, a).sum(axis=2)
            out.append(np.sign(g) * np.abs(g) ** (1 / power))
        return np.stack(out, 1)

    total = 0
    for name in blocks:
        g = gram(captured[name])
        # float32 after scaling each image's map to a largest |value| of 1: within float32 rounding of the largest
        # Gram feature (channels far below the largest activation lose digits at the highest orders, as in the
        # authors' float32)
        atol = 1e-6 * float(np.abs(captured[name]).max()) ** 2
        ours = gram_features(torch.tensor(captured[name])).double()
        torch.testing.assert_close(ours, torch.tensor(g), rtol=2e-6, atol=atol)
        for c in range(4):
            members = g[~held & (predicted == c)]
            if len(members):
                close(stats.gram[name]["mins"][c], members.min(0), rtol=2e-6, atol=atol)
                close(stats.gram[name]["maxs"][c], members.max(0), rtol=2e-6, atol=atol)
        lo, hi = stats.gram[name]["mins"].numpy(), stats.gram[name]["maxs"].numpy()

        def deviation(features, classes, lo=lo, hi=hi):
            low, high = lo[classes], hi[classes]
            below = np.maximum(low - features, 0) / np.abs(low + 1e-6)
            above = np.maximum(features - high, 0) / np.abs(high + 1e-6)
            return (below + above).reshape(len(features), -1).sum(1)

        mine = ours.numpy()  # the deviations from the features checked above (float64 ones sit ~1e-7 off the bounds)
        normaliser = deviation(mine[held], predicted[held]).mean()
        close(stats.gram[name]["normalizer"], normaliser, rtol=1e-9)
        total = total + deviation(gram_features(probed[name]).double().numpy(), probe_predicted) / normaliser
    scorer = build_scorer("gram").bind(network.net).fit_statistics(stats, network.net.head)
    with torch.no_grad(), block_outputs(network.net, scorer.needs_blocks) as out:
        features = network.net.features(probe)
        scores = scorer(Batch(features, network.net.head(features), out))
    assert (total[3:] > 1).all()  # the scaled images leave the bounds
    close(scores.double().numpy(), -total, rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0, 1e4])
def test_gram_features_stay_finite_and_exact_for_large_and_small_activations(magnitude):
    """x^20 overflows float32 above ~80 and x^10 underflows below ~1e-4: per-image scaling keeps every order finite
    and within float32 rounding of float64, also with signed maps and (N, T, D) token outputs."""
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((5, 6, 4, 4)) * magnitude
    maps[0] = 0.0  # an all-zero map: every feature 0

    def reference(x):  # float64 numpy: row sums of (x^p)(x^p)^T, signed p-th root
        x = x.reshape(len(x), x.shape[1], -1)
        rows = [np.einsum("ncs,nds->nc", x**p, x**p) for p in range(1, 11)]
        return np.stack([np.sign(r) * np.abs(r) ** (1 / p) for p, r in enumerate(rows, start=1)], 1)

    ours = gram_features(torch.tensor(maps, dtype=torch.float32)).double().numpy()
    assert np.isfinite(ours).all()
    close(ours, reference(maps.astype(np.float32).astype(np.float64)), rtol=1e-5, atol=1e-6 * magnitude**2)
    tokens = rng.standard_normal((3, 7, 5)) * magnitude  # (N, T, D): channels are the last dimension
    close(gram_features(torch.tensor(tokens, dtype=torch.float32)).double().numpy(),
          reference(tokens.astype(np.float32).astype(np.float64).transpose(0, 2, 1)),
          rtol=1e-5, atol=1e-6 * magnitude**2)  # fmt: skip
