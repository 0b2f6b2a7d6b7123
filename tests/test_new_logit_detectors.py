"""LTS, pNML, VRA (VRA+, VRA++, OpenOOD's) and GradUncertainty: each against an independent computation written here
from its authors' code (numpy, scipy or plain torch autograd) on small random features with ties and zeros, and
against pytorch-ood 0.4 (outlier scores: ours are their negatives, up to what each test names)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, softmax
from torch import nn

from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.lts import logit_scale
from lightning_ood.scoring.pnml import UnitOuter
from lightning_ood.scoring.vra import UnitQuantiles
from lightning_ood.statistics import FeatureSet, StatisticsAccumulator, StatisticsSetup, build_statistics
from tests.conftest import toy_features

pytorch_ood = pytest.importorskip("pytorch_ood.detector")

NEEDS = (UnitQuantiles, UnitOuter)


def statistics(train: torch.Tensor, labels: torch.Tensor, classes: int, head: nn.Module, batches: int = 1):
    """The statistics pass over in-memory features, with this file's extras, in ``batches`` batches."""
    setup = StatisticsSetup(classes, train.shape[1], len(labels))
    acc = StatisticsAccumulator(classes, train.shape[1], extras=build_statistics(NEEDS, setup))
    for idx in torch.arange(len(labels)).chunk(batches):
        with torch.no_grad():
            acc.update(train[idx], labels[idx], idx, head(train[idx]))
    return acc.compute()


@pytest.fixture(scope="module")
def p():
    """Training features with a dead unit, tied rows and exact zeros, a head that classifies most of them right, and
    test features near the classes, far from them, copies of training rows, and one all-zero feature."""
    L, C, N = 12, 5, 400
    labels, train, head, near, far = toy_features(L, C, N)
    test = torch.cat([near, far, train[:5], torch.zeros(1, L)])
    with torch.no_grad():
        logits = head(test)
    stats = statistics(train, labels, C, head)
    return SimpleNamespace(L=L, C=C, train=train, labels=labels, head=head, test=test, logits=logits, stats=stats,
                           W=head.weight.detach().double().numpy(), b=head.bias.detach().double().numpy(),
                           X=train.double().numpy(), T=test.double().numpy())  # fmt: skip


def ours(p, name, stats=None, **kwargs) -> np.ndarray:
    scorer = build_scorer(name, **kwargs).fit_statistics(stats or p.stats, p.head)
    return scorer.score(p.test, p.logits).double().numpy()


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def theirs(scores) -> np.ndarray:
    return scores.detach().double().cpu().numpy()


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


# ============================================================================================ pNML
def pnml_reference(train: np.ndarray, test: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """kobybibas/pnml_ood_detection ``src/lit_utils/baseline_lit_utils.py``: features normalised and the head run on
    them (lines 63-74), ``pinv(X^T X, rcond=1e-15)`` (105-116), the regret (184-202), scored as ``1 - regret``
    (171)."""
    x = train / np.linalg.norm(train, axis=1, keepdims=True)
    inverse = np.linalg.pinv(x.T @ x, rcond=1e-15)
    u = test / np.linalg.norm(test, axis=1, keepdims=True)
    probs = softmax(u @ w.T + b, axis=1)
    projection = np.abs(np.einsum("nl,lk,nk->n", u, inverse, u))
    g = (projection / (1 + projection))[:, None]
    regret = np.log((probs / (probs + (1 - probs) * probs**g)).sum(axis=1)) / np.log(probs.shape[1])
    return 1 - regret


def test_pnml_follows_the_authors_code(p):
    expected = pnml_reference(p.X, p.T[:-1], p.W, p.b)
    close(ours(p, "pnml")[:-1], expected, rtol=1e-6, atol=1e-8)
    # the feature is normalised before everything: a scaled feature scores the same; regrets lie in [0, 1]
    scorer = build_scorer("pnml").fit_statistics(p.stats, p.head)
    scores = scorer.score(p.test, p.logits)
    torch.testing.assert_close(scorer.score(3 * p.test, p.logits), scores)
    assert (scores >= 0).all() and (scores <= 1).all()


def test_pnml_agrees_with_pytorch_ood(p):
    """pytorch-ood returns the regret; it runs in float32 with torch's default pinv cut-off and clamps p to 1e-12."""
    reference = pytorch_ood.PNML(None, p.head).fit_features(p.train, p.labels).predict_features(p.test)
    close(ours(p, "pnml"), 1 - theirs(reference), rtol=1e-4, atol=1e-5)


def test_pnml_is_finite_where_the_softmax_saturates(p):
    """Logits far apart (p = 0 and p = 1 in float64): each genie is its limit, 0 or 1; the authors' form is 0 / 0."""
    head = nn.Linear(p.L, p.C)
    with torch.no_grad():
        head.weight.copy_(p.head.weight * 2000)
        head.bias.zero_()
    scorer = build_scorer("pnml").fit_statistics(p.stats, head)
    scores = scorer.score(p.test, head(p.test)).double()
    assert torch.isfinite(scores).all() and (scores <= 1 + 1e-12).all()


def test_pnml_statistic_is_the_same_in_any_batching(p):
    torch.testing.assert_close(statistics(p.train, p.labels, p.C, p.head, batches=7).unit_outer, p.stats.unit_outer)
    x = F.normalize(p.train.double(), dim=1)
    torch.testing.assert_close(p.stats.unit_outer, x.T @ x)


# ============================================================================================ VRA
def vra_reference(train, test, w, b, q1=None, q2=None, featmin=-1e6, featmax=1e6, lamb=0.0, a=0.0, m=1.0):
    """zeroQiaoba/VRA: per-unit quantiles of the training features (``ood_eval.py`` 154-160), ``x + lamb`` compared
    with the shifted thresholds, below to 0 and above to ``featmax`` (``models/resnet.py`` 206-209), energy
    (``util/score.py`` 93-109), VRA++'s ``-a sum (x0 - m)^2`` (81-91)."""
    if q1 is not None:
        featmin = np.quantile(train, q1, axis=0).astype(np.float32)
    if q2 is not None:
        featmax = np.quantile(train, q2, axis=0).astype(np.float32)
    x = test + np.float32(lamb)
    x = np.where(x < featmin + np.float32(lamb), 0.0, x)
    x = np.where(x > featmax + np.float32(lamb), np.broadcast_to(featmax, x.shape), x)
    return logsumexp(x.astype(np.float64) @ w.T + b, axis=1) - a * ((test.astype(np.float64) - m) ** 2).sum(axis=1)


@pytest.mark.parametrize(
    ("name", "kwargs", "reference"),
    [
        ("vra", {}, {"q1": 0.6, "q2": 0.9}),
        ("vra", {"lower": 30.0, "upper": 99.0}, {"q1": 0.3, "q2": 0.99}),
        ("vra_plus", {}, {"q1": 0.6, "q2": 0.95, "lamb": 0.6}),
        ("vra_plusplus", {}, {"q1": 0.5, "q2": 0.85, "a": 0.01, "m": 4.0}),
        ("vra", {"lower_clip": 0.5, "upper_clip": 1.0}, {"featmin": 0.5, "featmax": 1.0}),  # ImageNet's
        (
            "vra_plus",
            {"lower_clip": 0.6, "upper_clip": 0.7, "gamma": 0.3},
            {"featmin": 0.6, "featmax": 0.7, "lamb": 0.3},
        ),
        ("vra", {"lower": None}, {"q2": 0.9}),
    ],
)
def test_vra_follows_the_authors_code(p, name, kwargs, reference):
    train, test = p.train.numpy(), p.test.numpy()
    close(ours(p, name, **kwargs), vra_reference(train, test, p.W, p.b, **reference), rtol=1e-5, atol=1e-5)


def test_vra_thresholds_are_numpys_per_unit_quantiles_and_ties_stay(p):
    scorer = build_scorer("vra").fit_statistics(p.stats, p.head)
    close(scorer.alpha.numpy(), np.quantile(p.train.numpy(), 0.6, axis=0), rtol=0, atol=0)
    close(scorer.beta.numpy(), np.quantile(p.train.numpy(), 0.9, axis=0), rtol=0, atol=0)
    # a feature exactly at the thresholds keeps its values; just below alpha it is zeroed, above beta capped
    at = torch.where(torch.isfinite(scorer.alpha), scorer.alpha, 0.0)[None]
    torch.testing.assert_close(scorer.rectified(at), at)
    below = torch.nextafter(scorer.alpha, torch.tensor(-1.0))[None]
    assert (scorer.rectified(below)[:, scorer.alpha > 0] == 0).all()
    torch.testing.assert_close(scorer.rectified(scorer.beta[None] + 1), scorer.beta[None])
    # the dead unit: alpha = beta = 0, and a test value there is capped at 0
    assert scorer.alpha[3] == 0 and scorer.beta[3] == 0


def test_vra_statistic_is_the_same_in_any_batching_and_refuses_off_grid_percentiles(p):
    torch.testing.assert_close(statistics(p.train, p.labels, p.C, p.head, batches=9).unit_quantiles,
                               p.stats.unit_quantiles, rtol=0, atol=0)  # fmt: skip
    with pytest.raises(Exception, match="grid"):
        build_scorer("vra", lower=60.05).fit_statistics(p.stats, p.head)


def test_vra_openood_follows_openoods_postprocessor(p):
    """OpenOOD ``vra_postprocessor.py``: ``np.percentile`` of every ID-validation activation (lines 41-44), clip to
    [low, high] (49-50), ``logsumexp`` of the logits (55)."""
    val = p.train[::3]
    stats = statistics(p.train, p.labels, p.C, p.head)
    stats.reference["id_val"] = FeatureSet(val, p.head(val).detach(), p.labels[::3])
    log = val.numpy().flatten()
    low, high = np.percentile(log, 10), np.percentile(log, 90)
    expected = logsumexp(np.clip(p.T, low, high) @ p.W.T + p.b, axis=1)
    close(ours(p, "vra_openood", stats=stats), expected, rtol=1e-5, atol=1e-5)


def test_vra_per_unit_clamp_agrees_with_pytorch_ood_on_one_by_one_maps(p):
    """pytorch-ood clamps every element of the final feature map between its own quantiles: on 1 x 1 maps that is
    our per-unit rule with ``below="clamp"``. The authors zero what lies below alpha, so their VRA differs."""
    head = lambda z: p.head(z.flatten(1))  # noqa: E731
    vra = pytorch_ood.VRA(None, head, lower_percentile=0.6, upper_percentile=0.9)
    reference = vra.fit_feature_maps(p.train[:, :, None, None], p.labels).predict_feature_maps(p.test[:, :, None, None])
    close(ours(p, "vra", below="clamp"), -theirs(reference), rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours(p, "vra"), -theirs(reference), rtol=1e-3)


# ============================================================================================ GradUncertainty
def head_gradient_reference(head: nn.Linear, features: torch.Tensor) -> np.ndarray:
    """Per feature, autograd of pytorch-ood's loss, ``BCE(softmax(head(h)), 1)`` summed, w.r.t. the head's weight and
    bias: the sum of the squared norms (the logits here keep every p above 1e-12, where BCE clamps)."""
    out = []
    for h in features:
        ones = torch.ones(1, head.out_features, dtype=h.dtype)
        loss = F.binary_cross_entropy(head(h[None]).softmax(dim=1), ones, reduction="sum")
        grads = torch.autograd.grad(loss, [head.weight, head.bias])
        out.append(sum(float(g.double().square().sum()) for g in grads))
    return np.array(out)


def test_graduncertainty_head_equals_autograd_and_pytorch_ood(p):
    """Equal where every p > 1e-12; where some p is smaller, BCE's clamp in pytorch-ood's backward shrinks that
    class's gradient (see the module's docstring), and its score differs."""
    head = copy.deepcopy(p.head).double()
    features = p.test.double()
    with torch.no_grad():
        logits = head(features)
    plain = logits.softmax(dim=1).amin(dim=1) > 1e-12
    assert plain.sum() > 40 and (~plain).any()
    scores = build_scorer("graduncertainty_head").fit_statistics(p.stats, head).score(features, logits).numpy()
    expected = head_gradient_reference(head, features)
    close(scores[plain.numpy()], expected[plain.numpy()], rtol=1e-9, atol=1e-9)
    reference = -theirs(pytorch_ood.GradUncertainty(head).predict(features))  # the head as the whole model
    close(scores[plain.numpy()], reference[plain.numpy()], rtol=1e-9, atol=1e-9)
    assert not np.allclose(scores[~plain.numpy()], reference[~plain.numpy()], rtol=1e-3)


def test_graduncertainty_head_without_bias(p):
    head = nn.Linear(p.L, p.C, bias=False)
    with torch.no_grad():
        head.weight.copy_(p.head.weight)
    scorer = build_scorer("graduncertainty_head").fit_statistics(p.stats, head)
    logits = head(p.test).detach().double()
    g = (logits.softmax(dim=1) * p.C - 1).square().sum(dim=1)
    close(scorer.score(p.test, logits).numpy(), (p.test.double().square().sum(dim=1) * g).numpy(), rtol=1e-6)


class TinyNet(nn.Module):
    """Convolution, BatchNorm, ReLU, pooling and a head: the parts of the backbones, small enough for per-image
    gradients in a test (the registered scorer runs on a ResNet-20 in ``tests/test_scoring.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    net = TinyNet().double().eval()
    net.bn.running_mean.uniform_(-0.2, 0.2)  # a trained network's BatchNorm statistics, not a fresh one's
    net.bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64) * 3
    with torch.no_grad():
        features = net.features(x)
        logits = net.head(features)
    return SimpleNamespace(net=net, x=x, features=features, logits=logits)


def every_parameter_reference(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Per image, a backward pass of ``-sum_c log softmax`` (= BCE to all ones) and the squared norms of every
    parameter's gradient."""
    params = list(net.parameters())
    out = []
    for image in x:
        loss = -F.log_softmax(net(image[None]), dim=1).sum()
        out.append(sum(float(g.square().sum()) for g in torch.autograd.grad(loss, params)))
    return np.array(out)


def full_scores(network) -> torch.Tensor:
    scorer = build_scorer("graduncertainty").bind(network.net).fit_statistics(None, network.net.head)
    return scorer(Batch(network.features, network.logits, inputs=network.x))


def test_graduncertainty_every_parameter_equals_autograd_and_pytorch_ood(network, monkeypatch):
    import lightning_ood.scoring.graduncertainty as module

    monkeypatch.setattr(module, "CHUNK", 2)  # chunks of 2, 2 and 1 images give the same answer
    expected = every_parameter_reference(network.net, network.x)
    scores = full_scores(network)
    close(scores.numpy(), expected, rtol=1e-9, atol=1e-12)
    reference = pytorch_ood.GradUncertainty(network.net).predict(network.x)
    close(scores.numpy(), -theirs(reference), rtol=1e-9, atol=1e-12)
    assert not any(q.grad is not None for q in network.net.parameters())  # nothing written into the network


def test_graduncertainty_head_is_the_heads_share_of_every_parameter(network):
    head_only = build_scorer("graduncertainty_head").fit_statistics(None, network.net.head)
    head = head_only.score(network.features, network.logits)
    total = full_scores(network)
    assert (total > head).all()  # the backbone's parameters add to it
    filtered = pytorch_ood.GradUncertainty(network.net, param_filter=lambda n: n.startswith("head.")).predict(network.x)
    close(head.numpy(), -theirs(filtered), rtol=1e-9, atol=1e-12)


def test_graduncertainty_in_inference_mode_and_without_inputs(network):
    with torch.inference_mode():
        x = network.x.clone()
        scores = build_scorer("graduncertainty").bind(network.net)(Batch(network.features, network.logits, inputs=x))
    close(scores.numpy(), full_scores(network).numpy(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="inputs"):
        build_scorer("graduncertainty").bind(network.net)(Batch(network.features, network.logits))


# ============================================================================================ GradNormKL
def test_pytorch_ood_gradnorm_formerly_gradnormkl_is_our_gradnorm(p):
    """pytorch-ood 0.4's ``GradNorm`` is its former ``GradNormKL`` (renamed in 0.4.0; its old ``GradNorm`` is now
    ``GradUncertainty``); on the head's weight, as Huang et al., it is our ``gradnorm``, sign aside."""
    head = copy.deepcopy(p.head).double()
    reference = pytorch_ood.GradNorm(head, param_filter=lambda n: n == "weight").predict(p.test.double())
    close(ours(p, "gradnorm"), -theirs(reference), rtol=1e-5, atol=1e-7)


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
