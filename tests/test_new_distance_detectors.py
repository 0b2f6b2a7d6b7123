"""Mahalanobis++ / RMDS++, NECO and MahalanobisODIN, each against a re-implementation written here from its authors'
code (numpy and sklearn, as they compute it) on random features with ties and zeros, and against pytorch-ood 0.4 where
it has the method or its parts (its scores are outlier scores: ours are their negatives, up to the factors named)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from torch import nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.mahalanobis_pp import UnitGaussians
from lightning_ood.statistics import (
    FeatureStatistics,
    Reducers,
    StatisticsAccumulator,
    StatisticsSetup,
    build_statistics,
)

pytestmark = pytest.mark.numerics  # run again at another thread count by make test

pytorch_ood = pytest.importorskip("pytorch_ood.detector")

FEATURE_SCORERS = ("mahalanobis_pp", "rmds_pp", "neco")


def accumulate(train, labels, head, needs=(UnitGaussians,), batch=37) -> FeatureStatistics:
    """The statistics pass on in-memory features, in uneven batches."""
    num_classes, dim = head.out_features, train.shape[1]
    setup = StatisticsSetup(num_classes, dim, len(labels))
    acc = StatisticsAccumulator(num_classes, dim, extras=build_statistics(needs, setup))
    for start in range(0, len(labels), batch):
        rows = slice(start, start + batch)
        with torch.no_grad():
            acc.update(train[rows], labels[rows], torch.arange(len(labels))[rows], head(train[rows]))
    return acc.compute()


@pytest.fixture(scope="module")
def p():
    """Training features with ties (repeated rows) and zeros (a dead unit), a head, and test features near the
    classes, far from them, repeated training rows and one zero row."""
    g = torch.Generator().manual_seed(0)
    L, C, N = 12, 5, 400
    labels = torch.arange(N) % C
    centres = torch.rand(C, L, generator=g) * 3
    train = (centres[labels] + torch.randn(N, L, generator=g)).relu().double()
    train[:, 3] = 0.0  # a dead unit
    train[50:60] = train[40:50]  # ties
    head = nn.Linear(L, C).double()
    with torch.no_grad():
        head.weight.copy_(centres - 0.8 * centres.mean(0))
        head.bias.copy_(torch.randn(C, generator=g) * 0.1)
    test = torch.cat([(centres[torch.arange(30) % C] + torch.randn(30, L, generator=g)).relu().double(),
                      torch.rand(30, L, generator=g).double() * 6, train[:5], torch.zeros(1, L)])  # fmt: skip
    with torch.no_grad():
        logits = head(test)
    return SimpleNamespace(L=L, C=C, N=N, train=train, labels=labels, head=head, test=test, logits=logits,
                           stats=accumulate(train, labels, head), X=train.numpy(), T=test.numpy(), y=labels.numpy(),
                           Z=logits.numpy())  # fmt: skip


def ours(p, name, **kwargs) -> np.ndarray:
    scorer = build_scorer(name, **kwargs).fit_statistics(p.stats, p.head)
    return scorer.score(p.test, p.logits).double().numpy()


def close(a, b, rtol=1e-7, atol=1e-9):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ============================================================================================ Mahalanobis++, RMDS++
def authors_class_gaussian(train: np.ndarray, y: np.ndarray, num_classes: int):
    """maha-norm ``NINCO/detection_methods.py`` ``evaluate_Mahalanobis_norm``: class means and the precision of
    ``EmpiricalCovariance(assume_centered=True)`` of the class-centred normalised features."""
    means, centred = [], []
    for c in range(num_classes):
        fs = train[y == c]
        means.append(fs.mean(axis=0))
        centred.extend(fs - means[-1])
    return np.array(means), EmpiricalCovariance(assume_centered=True).fit(np.array(centred)).precision_


def test_unit_gaussians_are_the_normalised_features_moments_whatever_the_batches_and_ranks(p):
    u = normalised(p.X)
    means = np.stack([u[p.y == c].mean(0) for c in range(p.C)])
    within = sum((u[p.y == c] - means[c]).T @ (u[p.y == c] - means[c]) for c in range(p.C)) / p.N
    close(p.stats.unit_class_means.numpy(), means, rtol=1e-12, atol=1e-14)
    close(p.stats.unit_covariance.numpy(), within, rtol=1e-10, atol=1e-14)
    # two "ranks" on the two halves, their parts gathered in rank order as compute asks for them: the same statistics
    setup = StatisticsSetup(p.C, p.L, p.N)
    ranks = [build_statistics({UnitGaussians}, setup)["unit_gaussians"] for _ in range(2)]
    for rank, part in zip(ranks, (slice(0, 150), slice(150, None)), strict=True):
        acc = StatisticsAccumulator(p.C, p.L, extras={"unit_gaussians": rank})
        acc.update(p.train[part], p.labels[part], torch.arange(p.N)[part], p.head(p.train[part]).detach())
    second = ranks[1].gaussians
    other = [second.counts[None], second.means[None], second.scatter[None]]
    reduced = ranks[0].compute({"counts": p.stats.counts.double(), "n": torch.tensor(float(p.N), dtype=torch.float64)},
                               Reducers(gather=lambda t: torch.cat([t, other.pop(0)])))  # fmt: skip
    assert not other  # every part was gathered
    close(reduced["unit_class_means"].numpy(), means, rtol=1e-12, atol=1e-14)
    close(reduced["unit_covariance"].numpy(), within, rtol=1e-10, atol=1e-14)


def test_mahalanobis_pp_matches_the_authors_code(p):
    means, precision = authors_class_gaussian(normalised(p.X), p.y, p.C)
    with np.errstate(invalid="ignore"):
        t = normalised(p.T)  # the zero row becomes NaN there
    expected = -np.stack([(((t - m) @ precision) * (t - m)).sum(-1) for m in means], 1).min(1)
    mine = ours(p, "mahalanobis_pp")
    close(mine[:-1], expected[:-1], rtol=1e-8, atol=1e-8)
    assert np.isnan(expected[-1]) and np.isfinite(mine[-1])  # a zero feature: kept at zero here
    # not plain Mahalanobis: the normalisation matters
    assert not np.allclose(mine[:-1], ours(p, "mahalanobis")[:-1], rtol=1e-3)


def test_rmds_pp_matches_the_authors_code(p):
    """``evaluate_Relative_Mahalanobis_norm`` (and OpenOOD ``rmdsn``): the class-wise score minus the score under
    the Gaussian of all normalised training features."""
    u = normalised(p.X)
    means, precision = authors_class_gaussian(u, p.y, p.C)
    mean_global = u.mean(axis=0)
    prec_global = EmpiricalCovariance(assume_centered=True).fit(u - mean_global).precision_
    t = normalised(p.T[:-1])
    classwise = -np.stack([(((t - m) @ precision) * (t - m)).sum(-1) for m in means], 1).min(1)
    background = -(((t - mean_global) @ prec_global) * (t - mean_global)).sum(-1)
    close(ours(p, "rmds_pp")[:-1], classwise - background, rtol=1e-8, atol=1e-8)


def test_mahalanobis_pp_and_rmds_pp_equal_pytorch_ood_on_normalised_features(p):
    """pytorch-ood has neither, but its ``Mahalanobis`` and ``RMD`` fitted on normalised features are them, up to
    their scale: the inverse of the undivided scatter plus 1e-6 I, and Mahalanobis's half distance. The dead unit is
    left out (there the scatter is singular and their inverse huge where we take the pseudo-inverse)."""
    live = [i for i in range(p.L) if i != 3]
    train, test = torch.nn.functional.normalize(p.train[:, live]), torch.nn.functional.normalize(p.test[:-1, live])
    head = nn.Linear(len(live), p.C).double()
    stats = accumulate(p.train[:, live], p.labels, head)
    maha = build_scorer("mahalanobis_pp").fit_statistics(stats, head).score(p.test[:-1, live], None).numpy()
    theirs = pytorch_ood.Mahalanobis(None).fit_features(train.float(), p.labels).predict_features(test.float())
    close(maha, -2 * p.N * theirs.double().numpy(), rtol=2e-3, atol=1e-2)
    rmds = build_scorer("rmds_pp").fit_statistics(stats, head).score(p.test[:-1, live], None).numpy()
    theirs = pytorch_ood.RMD(None).fit_features(train.float(), p.labels).predict_features(test.float())
    close(rmds, -p.N * theirs.double().numpy(), rtol=2e-3, atol=1e-2)


def test_fit_on_features_accumulates_the_unit_gaussians(p):
    for name in ("mahalanobis_pp", "rmds_pp"):
        fitted = build_scorer(name).fit(p.train, p.labels, p.head).score(p.test, p.logits).numpy()
        close(fitted, ours(p, name), rtol=1e-10, atol=1e-10)


def test_mahalanobis_pp_without_its_statistics_says_so(p):
    stats = FeatureStatistics.from_features(p.train, p.labels, p.C, p.head)  # no unit_gaussians
    with pytest.raises(ConfigError, match="unit_gaussians"):
        build_scorer("mahalanobis_pp").fit_statistics(stats, p.head)


# ============================================================================================ NECO
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


# ============================================================================================ MahalanobisODIN
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


# ============================================================================================ device and dtype
@pytest.mark.parametrize("name", [*FEATURE_SCORERS, "mahalanobis_odin"])
def test_fitted_tensors_follow_the_scorer(p, name):
    """Every fitted tensor is a buffer: ``double()`` and ``to("meta")`` move them all (tests/test_device.py does so
    through a real test pass for every registered scorer)."""
    head = nn.Linear(p.L, p.C)  # float32, as a network's
    scorer = build_scorer(name).fit_statistics(p.stats, head)
    buffers = dict(scorer.named_buffers())
    assert {"terms.t2", "components", "class_terms.t2"} & set(buffers)  # the precision matrices and NECO's axes
    if name in FEATURE_SCORERS:
        float32 = scorer.score(p.test[:-1].float(), p.logits[:-1].float()).double()
        scorer.double()
        assert all(t.dtype == torch.float64 for t in scorer.buffers() if t.is_floating_point())
        torch.testing.assert_close(scorer.score(p.test[:-1], p.logits[:-1]), float32, rtol=1e-4, atol=1e-4)
    scorer.to("meta")
    assert all(t.device.type == "meta" for t in scorer.buffers())
