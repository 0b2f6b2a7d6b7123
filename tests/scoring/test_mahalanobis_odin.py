"""MahalanobisODIN (Lee et al., NeurIPS 2018, as pytorch-ood; lightning_ood/scoring/mahalanobis_odin.py) against
autograd and pytorch-ood 0.4's ``MahalanobisODIN``.
pytorch-ood 0.4's scores are outlier scores (higher = OOD): ours are their negatives, up to the factors each test
names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.statistics import FeatureStatistics

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


pytorch_ood = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def net():
    """A small convolutional network (6-d penultimate features), 150 training images of 3 classes with ties (repeated
    images) and a zero image, 8 test images."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()  # fmt: skip
    head = nn.Linear(6, 3)
    images, labels = torch.randn(150, 3, 8, 8), torch.arange(150) % 3
    images[10:20] = images[:10]
    images[20] = 0.0
    with torch.no_grad():
        train = features(images)
    x = torch.cat([torch.randn(6, 3, 8, 8), images[:1], torch.zeros(1, 3, 8, 8)])
    return SimpleNamespace(features=features, head=head, labels=labels, train=train, x=x, std=(0.5, 0.25, 0.2),
                           stats=FeatureStatistics.from_features(train, labels, 3, head))  # fmt: skip


def odin_scores(net, **kwargs) -> torch.Tensor:
    scorer = build_scorer("mahalanobis_odin", **kwargs).fit_statistics(net.stats, net.head)
    with torch.no_grad():
        h = net.features(net.x)
    batch = Batch(h, net.head(h), inputs=net.x, features_of=net.features, std=net.std)
    return scorer(batch).double()


def reference_mahalanobis_odin(net, eps: float) -> torch.Tensor:
    """pytorch-ood's ``MahalanobisODIN._odin_preprocess`` and Lee et al.'s ``get_Mahalanobis_score`` (one layer):
    the closest class's distance, the sign of its input gradient (``torch.sign``: 0 stays 0) divided by the std, the
    step against it, the closest distance again; Gaussians from scratch (maximum-likelihood tied covariance)."""
    f = net.train.double()
    means = torch.stack([f[net.labels == c].mean(0) for c in range(3)])
    centred = f - means[net.labels]
    precision = torch.linalg.pinv(centred.T @ centred / len(f))

    def closest(h):
        d = torch.stack([((h.double() - m) @ precision * (h.double() - m)).sum(1) for m in means], 1)
        return d.min(1).values

    moving = net.x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(closest(net.features(moving)).sum(), moving)
    moved = net.x - eps * torch.sign(grad) / torch.tensor(net.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return -closest(net.features(moved))


@pytest.mark.parametrize("eps", [0.002, 0.05])
def test_mahalanobis_odin_against_autograd_and_pytorch_ood(net, eps):
    mine = odin_scores(net, epsilon=eps)
    torch.testing.assert_close(mine, reference_mahalanobis_odin(net, eps), rtol=1e-5, atol=1e-6)
    detector = pytorch_ood.MahalanobisODIN(net.features, eps=eps, norm_std=list(net.std))
    theirs = detector.fit_features(net.train, net.labels).predict(net.x).double()
    # theirs: half the closest distance under the inverse of the undivided scatter (+ 1e-6 I)
    torch.testing.assert_close(mine, -2 * len(net.train) * theirs, rtol=1e-3, atol=1e-3)


def test_mahalanobis_odin_steps_the_inputs(net):
    """Without the step it is ``mahalanobis`` on the penultimate features; the step brings every image closer."""
    plain = build_scorer("mahalanobis").fit_statistics(net.stats, net.head)
    with torch.no_grad():
        h = net.features(net.x)
    unmoved = plain.score(h, net.head(h)).double()
    torch.testing.assert_close(odin_scores(net, epsilon=0.0), unmoved, rtol=1e-6, atol=1e-6)
    moved = odin_scores(net, epsilon=0.05)
    assert (moved[:-1] > unmoved[:-1]).all()  # closer to its class, higher score (the zero image may not move)
    with pytest.raises(ValueError, match="std"):
        scorer = build_scorer("mahalanobis_odin").fit_statistics(net.stats, net.head)
        scorer(Batch(h, net.head(h), inputs=net.x, features_of=net.features))
    with pytest.raises(ValueError, match="inputs"):
        build_scorer("mahalanobis_odin").fit_statistics(net.stats, net.head)(Batch(h, net.head(h)))
