"""Mahalanobis on Lee et al.'s layers (lightning_ood/scoring/ensemble.py) against autograd and re-implementations
written here from the authors' code:

- Lee et al.'s layers (pokaxpoka/deep_Mahalanobis_detector ``models/densenet.py`` and ``models/resnet.py``,
  ``feature_list`` / ``intermediate_forward``) and their per-layer score with input pre-processing
  (``lib_generation.py``, ``get_Mahalanobis_score``): ``mds_ensemble``;
- the paper's Mahalanobis (sunzh18/HIMPLoS ``utils/mahalanobis_lib.py`` and ``utils/cal_score.py``; the fitting in
  the authors' ``tune_mahalanobis_hyperparams``, sunzh18/ood_benchmark ``utils/mahalanobis_lib.py``: FGSM twins,
  ``LogisticRegressionCV``, the magnitude with the lowest FPR of ``get_measures``): ``mahalanobis_paper``.

The Gaussians follow their ``sample_estimator`` (class means of the channel means, ``EmpiricalCovariance`` of the
class-centred features), the regression is sklearn's, the FPR their ``fpr_and_fdr_at_recall`` (numpy:
``paper_fpr`` of tests/references.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance
from sklearn.linear_model import LogisticRegressionCV

from lightning_ood.data.base import IndexedDataset
from lightning_ood.engine import Engine, FitContext, accumulate_statistics
from lightning_ood.errors import ConfigError
from lightning_ood.hooks import block_outputs
from lightning_ood.models.cifar_resnet import resnet20
from lightning_ood.models.densenet import DenseNetBC
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.ensemble import PAPER_MAGNITUDES, StageGaussians, logistic_regression_cv
from lightning_ood.scoring.registry import paper_name
from tests.references import paper_fpr


def test_mahalanobis_ensemble_against_autograd(network):
    from lightning_ood.data.base import IndexedDataset
    from lightning_ood.fitting import FitInputs, compute_feature_statistics

    torch.manual_seed(2)
    images, labels = torch.randn(64, 3, 32, 32), torch.arange(64) % 4
    inputs = FitInputs(network.net, "test", frozenset({StageGaussians}))
    loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(images, labels)), batch_size=16)
    stats = compute_feature_statistics(inputs, loader, progress=False, log=False)
    stages = network.net.stages()

    def stage_means(x):
        with block_outputs(network.net, stages) as out:
            network.net.features(x)
        return {name: out[name].mean(dim=(2, 3)).double() for name in stages}

    with torch.no_grad():
        train = stage_means(images)
    params = {}
    for name in stages:  # class means and the shared covariance, from scratch
        f = train[name]
        means = torch.stack([f[labels == c].mean(0) for c in range(4)])
        centred = f - means[labels]
        params[name] = (means, torch.linalg.pinv(centred.T @ centred / len(f), hermitian=True))
        torch.testing.assert_close(stats.stages[name]["class_means"], means, rtol=1e-9, atol=1e-9)

    def closest(f, name):
        means, precision = params[name]
        d = torch.stack([((f - m) @ precision * (f - m)).sum(1) for m in means], 1)
        return d.min(1).values

    x, eps, std = network.x, 0.01, (0.5, 0.25, 0.2)
    expected = torch.zeros(len(x), dtype=torch.float64)
    for name in stages:
        moving = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(closest(stage_means(moving)[name], name).sum(), moving)
        moved = x - eps * torch.where(grad >= 0, 1.0, -1.0) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            expected -= closest(stage_means(moved)[name], name)
    scorer = build_scorer("mds_ensemble", epsilon=eps).bind(network.net).fit_statistics(stats, network.net.head)
    with torch.no_grad():
        h = network.net.features(x)
    scores = scorer(Batch(h, network.net.head(h), inputs=x, features_of=network.net.features, std=std))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


NUM_CLASSES = 3


def lee_densenet_layer(net: DenseNetBC, x: torch.Tensor, layer_index: int) -> torch.Tensor:
    """DenseNet3.intermediate_forward: conv1; trans1(block1); trans2(block2); relu(bn1(block3))."""
    out = net.conv1(x)
    for i in range(layer_index):
        out = net.dense[i](out)
        out = net.transitions[i](out) if i < 2 else F.relu(net.bn(out))
    return out


def lee_resnet_layer(net, x: torch.Tensor, layer_index: int) -> torch.Tensor:
    """ResNet.intermediate_forward: relu(bn1(conv1)), then layer1 ... layer_index."""
    out = F.relu(net.bn1(net.conv1(x)))
    for i in range(layer_index):
        out = net.layers[i](out)
    return out


def channel_means(out: torch.Tensor) -> np.ndarray:
    return out.reshape(out.shape[0], out.shape[1], -1).mean(2).detach().numpy()


def sample_estimator(layer_fn, num_layers: int, images: torch.Tensor, labels: np.ndarray):
    """Their sample_estimator: per layer, class means and the precision of the class-centred channel means."""
    means, precisions = [], []
    with torch.no_grad():
        for k in range(num_layers):
            f = channel_means(layer_fn(images, k))
            mu = np.stack([f[labels == c].mean(0) for c in range(NUM_CLASSES)])
            centred = np.concatenate([f[labels == c] - mu[c] for c in range(NUM_CLASSES)])
            means.append(mu)
            precisions.append(EmpiricalCovariance(assume_centered=False).fit(centred).precision_)
    return means, precisions


def gaussian_scores(f: np.ndarray, mu: np.ndarray, precision: np.ndarray) -> np.ndarray:  # (N, C): -0.5 d_c
    return np.stack([-0.5 * np.einsum("ni,ij,nj->n", f - m, precision, f - m) for m in mu], 1)


def their_layer_score(layer_fn, x, k, means, precisions, magnitude, std=None) -> np.ndarray:
    """get_Mahalanobis_score for one layer: the closest class at x, the sign of the gradient of mean(-pure_gau)
    (divided by the std in Lee et al.'s code, not in HIMPLoS's), the max Gaussian score of the moved input."""
    mu, precision = torch.tensor(means[k]), torch.tensor(precisions[k])
    data = x.clone().requires_grad_(True)
    f = layer_fn(data, k)
    f = f.reshape(f.shape[0], f.shape[1], -1).mean(2)
    closest = gaussian_scores(f.detach().numpy(), means[k], precisions[k]).argmax(1)
    zero_f = f - mu[closest]
    pure_gau = -0.5 * ((zero_f @ precision) * zero_f).sum(1)
    (-pure_gau).mean().backward()
    gradient = (torch.ge(data.grad, 0).double() - 0.5) * 2
    if std is not None:
        gradient = gradient / torch.tensor(std, dtype=gradient.dtype).view(1, 3, 1, 1)
    with torch.no_grad():
        noisy = channel_means(layer_fn(x - magnitude * gradient, k))
    return gaussian_scores(noisy, means[k], precisions[k]).max(1)


@pytest.fixture(scope="module")
def densenet():
    """A small random DenseNet-BC in float64 (the same layer structure as DenseNet-BC-100), 16x16 images in [0, 1]:
    60 training images for the Gaussians, 40 more to fit the regression on, 6 test images."""
    torch.manual_seed(0)
    net = DenseNetBC(depth=10, growth=6, num_classes=NUM_CLASSES).double().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    train = torch.rand(60, 3, 16, 16, generator=g, dtype=torch.float64)
    fit = torch.rand(40, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % NUM_CLASSES
    fit_labels = torch.randint(0, NUM_CLASSES, (40,), generator=g)
    x = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)
    return SimpleNamespace(net=net, train=train, labels=labels, fit=fit, fit_labels=fit_labels, x=x)


def engine_for(case, scorers, std=None):
    engine = Engine(case.net, scorers, std=std)
    dataset = IndexedDataset(torch.utils.data.TensorDataset(case.train, case.labels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    stats = accumulate_statistics(case.net, loader, engine.needs.statistics, progress=False)

    def training_images(count, seed):  # the images the regression is fitted on, never the scored ones
        fit = IndexedDataset(torch.utils.data.TensorDataset(case.fit[:count], case.fit_labels[:count]))
        return torch.utils.data.DataLoader(fit, batch_size=16)

    logged = []
    return engine.fit(stats, FitContext(case.net, training_images, log=logged.append)), logged


@pytest.mark.numerics
def test_stages_are_lee_et_al_feature_list(densenet):
    """stages() captures their feature_list: DenseNet3's conv1, trans1, trans2, relu(bn1(block3)); ResNet's
    relu(bn1(conv1)) and every stage (before: the dense blocks' outputs before the transitions, no stem)."""
    torch.manual_seed(3)
    resnet = resnet20(num_classes=NUM_CLASSES).double().eval()
    for net, layer_fn, count in ((densenet.net, lee_densenet_layer, 4), (resnet, lee_resnet_layer, 4)):
        x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
        names = net.stages()
        assert len(names) == count
        with torch.no_grad(), block_outputs(net, names) as captured:
            net.features(x)
            expected = [layer_fn(net, x, k) for k in range(count)]
        for name, want in zip(names, expected, strict=True):
            torch.testing.assert_close(captured[name], want, rtol=0, atol=0)


@pytest.mark.numerics
def test_mds_ensemble_against_lee_et_al(densenet):
    """mds_ensemble = the sum over Lee et al.'s layers of their per-layer score (std-divided step), times 2 (their
    -0.5 d against our -d), with statistics from their sample_estimator."""
    net, std, eps = densenet.net, (0.2, 0.25, 0.3), 0.01
    engine, _ = engine_for(densenet, {"mds_ensemble": {"epsilon": eps}}, std=std)
    _, scores = engine(densenet.x)

    def layer(x, k):
        return lee_densenet_layer(net, x, k)

    means, precisions = sample_estimator(layer, 4, densenet.train, densenet.labels.numpy())
    expected = sum(their_layer_score(layer, densenet.x, k, means, precisions, eps, std) for k in range(4))
    np.testing.assert_allclose(scores["mds_ensemble"].numpy(), 2 * expected, rtol=1e-7)


@pytest.mark.numerics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_regression_cv_is_sklearns(seed):
    """LogisticRegressionCV() as the authors call it (Cs=10, 5 stratified folds, accuracy, L2, refit): the same C,
    coefficients and intercept, on ID-like vs adversarial-like layer scores (their order: ID rows first)."""
    rng = np.random.default_rng(seed)
    half = 50
    x = np.concatenate([rng.normal(-3, 1, (half, 4)), rng.normal(-4, 1.5, (half, 4))])
    y = np.r_[np.zeros(half), np.ones(half)]
    theirs = LogisticRegressionCV(Cs=10, cv=5, scoring="accuracy", l1_ratios=(0.0,), use_legacy_attributes=True)
    theirs.fit(x, y)
    coef, intercept, c = logistic_regression_cv(torch.tensor(x), torch.tensor(y))
    assert c == theirs.C_[0]
    np.testing.assert_allclose(coef.numpy(), theirs.coef_[0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(float(intercept), theirs.intercept_[0], rtol=1e-3, atol=1e-5)


def their_fit_and_scores(case, magnitudes):
    """tune_mahalanobis_hyperparams + iterate_data_mahalanobis, on the same fit images: FGSM twins of both halves,
    a regression per magnitude on the first half, its FPR on the second, the best (strictly lower) kept."""
    net = case.net

    def layer(x, k):
        return lee_densenet_layer(net, x, k)

    means, precisions = sample_estimator(layer, 4, case.train, case.labels.numpy())

    def features(x, magnitude):  # get_Mahalanobis_score: (N, 4), no std division
        return np.stack([their_layer_score(layer, x, k, means, precisions, magnitude) for k in range(4)], 1)

    inputs = case.fit.clone().requires_grad_(True)
    F.cross_entropy(net(inputs), case.fit_labels).backward()
    twins = torch.clamp(case.fit + 0.05 * (torch.ge(inputs.grad, 0).double() - 0.5) * 2, 0.0, 1.0)
    m = len(case.fit) // 2
    best = (1.1, None, None)
    for magnitude in magnitudes:
        train = np.concatenate([features(case.fit[:m], magnitude), features(twins[:m], magnitude)])
        regressor = LogisticRegressionCV(Cs=10, cv=5, scoring="accuracy", l1_ratios=(0.0,), use_legacy_attributes=True)
        regressor.fit(train, np.r_[np.zeros(m), np.ones(m)])
        val_in = -regressor.predict_proba(features(case.fit[m:], magnitude))[:, 1]
        val_out = -regressor.predict_proba(features(twins[m:], magnitude))[:, 1]
        fpr = paper_fpr(np.r_[np.ones(m), np.zeros(m)], np.r_[val_in, val_out])
        if fpr < best[0]:
            best = (fpr, magnitude, regressor)
    _, magnitude, regressor = best
    return magnitude, regressor, -regressor.predict_proba(features(case.x, magnitude))[:, 1]


@pytest.mark.numerics
@pytest.mark.parametrize("magnitudes", [PAPER_MAGNITUDES, (0.05, 0.0)])
def test_mahalanobis_paper_against_the_authors(densenet, magnitudes):
    """The chosen magnitude, the regression and the scores -predict_proba[:, 1] of the authors' procedure."""
    engine, logged = engine_for(densenet, {"mahalanobis_paper": {"magnitudes": magnitudes, "images": 40}})
    _, scores = engine(densenet.x)
    scorer = engine.fitted()["mahalanobis_paper"]
    magnitude, regressor, expected = their_fit_and_scores(densenet, magnitudes)
    assert scorer.magnitude == magnitude
    np.testing.assert_allclose(scorer.coef.numpy(), regressor.coef_[0], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(scores["mahalanobis_paper"].numpy(), expected, rtol=1e-3, atol=1e-9)
    assert "20 held-out ID training images" in logged[0]


@pytest.mark.numerics
def test_mahalanobis_paper_holds_the_papers_cell_and_needs_training_images(densenet):
    assert paper_name("mahalanobis_paper") == "Mahalanobis" and paper_name("mahalanobis") is None
    engine = Engine(densenet.net, ["mahalanobis_paper"])
    stats = accumulate_statistics(
        densenet.net,
        torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(densenet.train, densenet.labels))),
        engine.needs.statistics,
        progress=False,
    )
    with pytest.raises(ConfigError, match="ID training images"):
        engine.fit(stats)  # no FitContext with training images: nothing else (no test image) is used instead
    scorer = build_scorer("mahalanobis_paper").bind(densenet.net)
    with pytest.raises(RuntimeError, match="not fitted"):
        scorer(Batch(densenet.x[:, 0, 0], densenet.x[:, 0, 0], inputs=densenet.x, features_of=densenet.net.features))
