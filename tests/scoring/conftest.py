"""What the scorer tests share: their toy problems (fixtures, and builders for the modules whose ``p`` is
another problem), small networks, and how they score and compare (``ours``, ``theirs``, ``close``,
``score_with``, ``assert_scores``)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.data.base import IndexedDataset
from lightning_ood.engine import FitContext
from lightning_ood.models import build_backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.caref import PredictedMeans
from lightning_ood.scoring.mahalanobis_pp import UnitGaussians
from lightning_ood.scoring.pnml import UnitOuter
from lightning_ood.scoring.vra import UnitQuantiles
from lightning_ood.statistics import (
    Bank,
    FeatureSet,
    FeatureStatistics,
    StatisticsAccumulator,
    StatisticsSetup,
    build_statistics,
)
from tests.conftest import toy_features
from tests.helpers import QUICK_SETTINGS

# ------------------------------------------------------------------------------------- fitting, scoring and comparing

RTOL, ATOL = 1e-5, 1e-6  # float32 paths against float64 references


def score_with(name: str, p, **kwargs) -> np.ndarray:
    scorer = build_scorer(name, **kwargs).fit(p.train, p.labels, p.head)
    scores = scorer.score(p.test, p.logits)
    assert scores.shape == (len(p.test),)
    return scores.double().numpy()


def assert_scores(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def differs(a: np.ndarray, b: np.ndarray, by: float = 1e-3) -> bool:
    return bool(np.max(np.abs(a - b)) > by)


def energy(z):
    return logsumexp(z, axis=1)


def ours(p, name, stats=None, **kwargs) -> np.ndarray:
    scorer = build_scorer(name, **kwargs).fit_statistics(stats or p.stats, p.head)
    return scorer.score(p.test, p.logits).double().numpy()


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def theirs(scores) -> np.ndarray:
    """pytorch-ood's scores (a tensor, or what numpy takes) as a float64 array."""
    return scores.detach().double().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)


# ----------------------------------------------------------------------------------------------------- small networks


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)
        with torch.no_grad():
            self.conv.weight[:, 2] = 0  # channel 2 is ignored: its input gradient is exactly zero

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)).mean(dim=(2, 3))


STD = (0.25, 0.5, 0.2)


@pytest.fixture(scope="module")
def resnet():
    """A random ResNet-20, 48 training images of 4 classes and 6 test images: the one-pass path of every scorer."""
    from lightning_ood.models import build_backbone

    torch.manual_seed(0)
    net = build_backbone("resnet20", 4).eval()
    images, labels = torch.randn(48, 3, 32, 32), torch.arange(48) % 4
    return SimpleNamespace(net=net, images=images, labels=labels, x=torch.randn(6, 3, 32, 32))


def engine_scores(name: str, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, x: torch.Tensor):
    """The scores of ``x`` by the registered scorer ``name`` through the evaluation engine, as the test pass runs it:
    the statistics it declares (composed scorers: their parts' too) on ``images``, its reference images, fitted,
    then one engine call, in the network's own precision."""
    from lightning_ood.data.base import IndexedDataset
    from lightning_ood.engine import Engine, FitContext, accumulate_statistics
    from lightning_ood.statistics import FeatureSet

    settings = {**QUICK_SETTINGS.get(name, {}), **({"block": "layer1.0"} if name == "featurenorm" else {})}
    engine = Engine(net, {name: {"scorer": name, **settings}}, std=(0.25, 0.25, 0.25))
    dataset = IndexedDataset(torch.utils.data.TensorDataset(images, labels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    stats = accumulate_statistics(net, loader, engine.needs.statistics, progress=False)
    with torch.no_grad():
        reference = net.features(images[:20])
    for ref in engine.needs.references:
        stats.reference[ref] = FeatureSet(reference, net.head(reference), labels[:20])
    # mahalanobis_paper and nac fit on ID training images, adascale on the (here: training) id_val images
    context = FitContext(net, lambda count, seed: loader, reference_images=lambda reference: loader)
    _, scores = engine.fit(stats, context)(x)
    return scores[name]


@pytest.fixture(scope="module")
def network():
    """A random ResNet-20 in eval mode with moving BatchNorm statistics, and a batch with its captured maps."""
    torch.manual_seed(0)
    net = build_backbone("resnet20", 4).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        features = net.features(x)
    return SimpleNamespace(net=net, x=x, features=features, logits=net.head(features))


# ------------------------------------------ features in float64 with the unit Gaussians (Mahalanobis++, RMDS++, NECO)


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


def toy_problem_in_float64():
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


# ------------------- features with the unit statistics and an all-zero test feature (LTS, pNML, VRA, GradUncertainty)

NEEDS = (UnitQuantiles, UnitOuter)


def unit_statistics(train: torch.Tensor, labels: torch.Tensor, classes: int, head: nn.Module, batches: int = 1):
    """The statistics pass over in-memory features, with this file's extras, in ``batches`` batches."""
    setup = StatisticsSetup(classes, train.shape[1], len(labels))
    acc = StatisticsAccumulator(classes, train.shape[1], extras=build_statistics(NEEDS, setup))
    for idx in torch.arange(len(labels)).chunk(batches):
        with torch.no_grad():
            acc.update(train[idx], labels[idx], idx, head(train[idx]))
    return acc.compute()


def toy_problem_with_unit_statistics():
    """Training features with a dead unit, tied rows and exact zeros, a head that classifies most of them right, and
    test features near the classes, far from them, copies of training rows, and one all-zero feature."""
    L, C, N = 12, 5, 400
    labels, train, head, near, far = toy_features(L, C, N)
    test = torch.cat([near, far, train[:5], torch.zeros(1, L)])
    with torch.no_grad():
        logits = head(test)
    stats = unit_statistics(train, labels, C, head)
    return SimpleNamespace(L=L, C=C, train=train, labels=labels, head=head, test=test, logits=logits, stats=stats,
                           W=head.weight.detach().double().numpy(), b=head.bias.detach().double().numpy(),
                           X=train.double().numpy(), T=test.double().numpy())  # fmt: skip


# -------------------------------------------------------------------------- features in the bank (GMM, CF-OOD, GrOOD)


def toy_problem_in_the_bank():
    """Training features exactly representable in float16 (the bank equals them), ties (repeated rows), zeros (a dead
    unit, an all-zero row), a head that classifies most of them right, and test features near and far."""
    L, C, N = 12, 5, 400
    labels, train, head, near, far = toy_features(L, C, N)
    train[7] = 0.0  # a zero feature
    train = train.half().float()
    test = torch.cat([near, far])
    stats = FeatureStatistics.from_features(train, labels, C, head)
    return SimpleNamespace(L=L, C=C, N=N, train=train, labels=labels, head=head, test=test, stats=stats)


def fitted_on_statistics(p, name, **kwargs):
    return build_scorer(name, **kwargs).fit_statistics(p.stats, p.head)


def fitted64(p, name, **kwargs):
    """Fitted with a float64 head: the scorer's fitted tensors in float64 from the start (the algorithm, not float32
    rounding, as the references compute it)."""
    return build_scorer(name, **kwargs).fit_statistics(p.stats, copy.deepcopy(p.head).double())


def in_float64(scorer, features, head):
    """The scorer's scores in float64 (its fitted tensors cast by ``double()``): the algorithm, not float32 rounding."""
    scorer, head = scorer.double(), copy.deepcopy(head).double()
    with torch.no_grad():
        h = features.double()
        return scorer.score(h, head(h)).numpy()


# --------------------------------------------------------- features under a float64 head (WeiPer, CARef, CADRef, ORA)


def bank_statistics(train, labels, head, batch=None):
    """The statistics pass over ``train`` in batches of ``batch``, with the extras these scorers read."""
    n, dim = train.shape
    setup = StatisticsSetup(head.out_features, dim, n, bank_images=n)
    acc = StatisticsAccumulator(head.out_features, dim, extras=build_statistics({Bank, PredictedMeans}, setup))
    for index in torch.arange(n).split(batch or n):
        with torch.no_grad():
            acc.update(train[index], labels[index], index, head(train[index]))
    return acc.compute()


def toy_problem_with_a_float64_head():
    """Training features exactly representable in float16 (the bank equals them), ties and a dead unit, a float64
    head, and test features near, far (beyond the training range) and equal to training ones, and an all-zero one."""
    g = torch.Generator().manual_seed(0)
    L, C, N = 12, 5, 300
    labels = torch.arange(N) % C
    centres = torch.rand(C, L, generator=g) * 3
    train = (centres[labels] + torch.randn(N, L, generator=g)).relu()
    train[:, 3] = 0.0
    train[50:60] = train[40:50]
    train = train.half().double()
    head = nn.Linear(L, C).double()
    with torch.no_grad():
        head.weight.copy_(centres - 0.8 * centres.mean(0))
        head.weight[1, 5] = 0.0  # a zero weight: in neither of CADRef's parts
        head.bias.copy_(torch.randn(C, generator=g) * 0.1)
    test = torch.cat([(centres[torch.arange(30) % C] + torch.randn(30, L, generator=g)).relu(),
                      torch.rand(20, L, generator=g) * 6, train[:5], torch.zeros(1, L)]).double()  # fmt: skip
    with torch.no_grad():
        logits = head(test)
    return SimpleNamespace(L=L, C=C, train=train, labels=labels, head=head, test=test, logits=logits,
                           stats=bank_statistics(train, labels, head), W=head.weight.detach().numpy(),
                           b=head.bias.detach().numpy(), X=train.numpy(), T=test.numpy())  # fmt: skip


# ------------------------------------------------ a ResNet-20 with dead channels and images to fit on (AdaSCALE, NAC)

C = 4


@pytest.fixture(scope="module")
def net():
    """A random ResNet-20 in eval mode with moving BatchNorm statistics; channel 0 of every stage's output is dead
    (a very negative BatchNorm bias before the last ReLU), so some layer outputs and features are exactly 0."""
    torch.manual_seed(0)
    network = build_backbone("resnet20", C).eval()
    for m in network.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        for stage in network.layers:
            stage[-1].bn2.bias[0] = -100.0
    return network


@pytest.fixture(scope="module")
def data(net):
    """Fitting images (two repeated: ties) and test images (one repeated, and two of the fitting ones)."""
    g = torch.Generator().manual_seed(1)
    fit = torch.randn(14, 3, 16, 16, generator=g)  # 16 x 16: the ResNet-20 pools any size
    fit[12:] = fit[:2]
    test = torch.cat([torch.randn(5, 3, 16, 16, generator=g) * 1.5, fit[3:5]])
    test = torch.cat([test, test[:1]])
    with torch.no_grad():
        features = net.features(fit)
    labels = torch.arange(len(fit)) % C
    stats = FeatureStatistics.from_features(features, labels, C, net.head)
    loader = DataLoader(IndexedDataset(TensorDataset(fit, labels)), batch_size=5)
    context = FitContext(net, training_images=lambda count, seed: loader, reference_images=lambda ref: loader,
                         log=lambda message: None)  # fmt: skip
    return SimpleNamespace(fit=fit, test=test, stats=stats, loader=loader, context=context, labels=labels)


def fitted_on_the_network(net, data, name, **kwargs):
    return build_scorer(name, **kwargs).bind(net).prepare(data.context).fit_statistics(data.stats, net.head)


def score(net, scorer, x):
    with torch.no_grad():
        features = net.features(x)
    return scorer(Batch(features, net.head(features), inputs=x, features_of=net.features))


# ------------------------------------------------------- held-out ID images (temperature scaling, KL matching, ReAct)


@pytest.fixture(scope="module")
def q():
    """Training, held-out ID validation and test features of 4 classes under a head that is right most of the time
    and overconfident (logits scaled up, so the NLL-optimal T is above 1); the validation images' logits differ
    from the training images', so that templates or a T from the wrong set give other scores."""
    g = torch.Generator().manual_seed(7)
    L, C = 10, 4
    centres = torch.rand(C, L, generator=g) * 3

    def images(n, spread):
        labels = torch.arange(n) % C
        return (centres[labels] + torch.randn(n, L, generator=g) * spread).relu(), labels

    train, train_labels = images(300, 0.6)
    val, val_labels = images(120, 1.4)  # unseen images: further from the class centres than the training ones
    test = torch.cat([images(40, 1.4)[0], torch.rand(20, L, generator=g) * 5])
    head = nn.Linear(L, C)
    with torch.no_grad():
        head.weight.copy_((centres - 0.8 * centres.mean(0)) * 4)
        head.bias.copy_(torch.randn(C, generator=g) * 0.1)
        val_logits, test_logits = head(val), head(test)
    stats = FeatureStatistics.from_features(train, train_labels, C, head)
    stats.reference["id_val"] = FeatureSet(val, val_logits, val_labels)
    return SimpleNamespace(C=C, head=head, stats=stats, test=test, test_logits=test_logits, logits=test_logits,
                           W=head.weight.detach().double().numpy(), b=head.bias.detach().double().numpy(),
                           val=val.double().numpy(), val_y=val_labels.numpy(), train=train.double().numpy(),
                           T=test.double().numpy())  # fmt: skip
