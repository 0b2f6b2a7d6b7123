"""AdaSCALE-A / AdaSCALE-L (Regmi, arXiv 2025) and NAC-UE (Liu et al., ICLR 2024): each against an independent
computation written here from the authors' code (OpenOOD ``adascale_postprocessor.py`` / ``adascale_net.py``;
BierOne/ood_coverage ``nac/coverage.py``, ``nac/utils.py``, ``nac/instr_state.py``) on a small random ResNet-20 with
ties (repeated images) and zeros (dead channels, zero features), against pytorch-ood 0.4 where it has the method
(NACUE; it has no AdaSCALE, whose limit p_min = p_max is SCALE), and through the engine, on float64 and meta."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ood.scoring.nac as nac_module
from lightning_ood.data.base import IndexedDataset
from lightning_ood.engine import Engine, FitContext
from lightning_ood.errors import ConfigError
from lightning_ood.models import build_backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.activation import scale
from lightning_ood.scoring.adascale import adaptive_ratio
from lightning_ood.scoring.base import Batch
from lightning_ood.statistics import FeatureStatistics

pytorch_ood = pytest.importorskip("pytorch_ood.detector")
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


def fitted(net, data, name, **kwargs):
    return build_scorer(name, **kwargs).bind(net).prepare(data.context).fit_statistics(data.stats, net.head)


def score(net, scorer, x):
    with torch.no_grad():
        features = net.features(x)
    return scorer(Batch(features, net.head(features), inputs=x, features_of=net.features))


# ============================================================================================ AdaSCALE
def authors_features(net, x, o):
    """OpenOOD's ``postprocess`` + ``perturb``: the gradient of the predicted logit, the o share of input values of
    smallest |gradient| moved by 0.5 * sign."""
    data = x.clone().requires_grad_(True)
    output = net(data)
    feature = net.features(data)
    labels = output.detach().argmax(dim=1)
    output[torch.arange(len(labels)), labels].backward(torch.ones(len(labels)))
    grad = data.grad.detach()
    b, c, h, w = x.shape
    n_pixels = int(c * h * w * o)
    abs_grad = grad.abs().view(b, -1)
    _, smallest = torch.topk(abs_grad, n_pixels, dim=1, largest=False)
    mask = torch.zeros_like(abs_grad, dtype=torch.uint8).scatter_(1, smallest, 1).view(b, c, h, w)
    with torch.no_grad():
        perturbed = net.features(x + grad.sign() * mask * 0.5)
    return feature.detach().double().numpy(), perturbed.double().numpy()


def authors_q(feature, perturbed, k_shift, k_correction, lmbda):
    """``get_percentile``'s Q' in numpy, the tops by a stable sort (the tests' features have no ties at the top)."""
    top_c = np.argsort(-feature, axis=1, kind="stable")[:, :k_correction]
    top_s = np.argsort(-feature, axis=1, kind="stable")[:, :k_shift]
    correction = np.take_along_axis(np.maximum(perturbed, 0), top_c, 1).sum(1)
    shift = np.take_along_axis(np.abs(feature - perturbed), top_s, 1).sum(1)
    return correction + lmbda * shift


def authors_adascale(feature, perturbed, fitted_q, low, high, k_shift, k_correction, lmbda, variant, w, b):
    """ECDF (statsmodels': share of fitted values <= x), ``ada_scale`` and ``forward_threshold`` in numpy, energy."""
    q = authors_q(feature, perturbed, k_shift, k_correction, lmbda)
    ecdf = np.searchsorted(np.sort(fitted_q), q, side="right") / len(fitted_q)
    p = low + (1 - ecdf) * (high - low)
    x = np.maximum(feature, 0)
    n = x.shape[1]
    ks = n - np.round(n * p / 100.0).astype(int)
    top_sums = np.array([np.sort(row)[::-1][:k].sum() for row, k in zip(x, ks, strict=True)])
    r = x.sum(1) / np.maximum(top_sums, 1e-12)  # ours guards 0 / 0 (the authors' NaN) as our SCALE
    logits = (feature * np.exp(r)[:, None]) @ w.T + b if variant == "a" else (feature @ w.T + b) * r[:, None] ** 2
    return logsumexp(logits, axis=1), p


@pytest.mark.parametrize(
    "variant, percentiles, shares",
    [("a", (75.0, 85.0), (1.0, 5.0)), ("a", (60.0, 99.0), (10.0, 20.0)), ("l", (60.0, 99.0), (10.0, 20.0))],
)
def test_adascale_agrees_with_the_authors_computation(net, data, variant, percentiles, shares):
    """k1 = 1% of the ResNet-20's 64 units is 0 (no shift term: the authors' int()), so the shares are also raised."""
    w, b = net.head.weight.detach().double().numpy(), net.head.bias.detach().double().numpy()
    for shift_percent, correction_percent in [shares]:
        kwargs = dict(variant=variant, percentiles=percentiles, shift_percent=shift_percent,
                      correction_percent=correction_percent, reference="id_val")  # fmt: skip
        scorer = fitted(net, data, f"adascale_{variant}", **kwargs)
        k_shift, k_correction = int(64 * shift_percent / 100), int(64 * correction_percent / 100)
        fit_h, fit_hp = authors_features(net, data.fit, 0.05)
        fitted_q = authors_q(fit_h, fit_hp, k_shift, k_correction, 10.0)
        np.testing.assert_allclose(scorer.fitted_shifts.double().numpy(), np.sort(fitted_q), rtol=1e-5, atol=1e-6)
        h, hp = authors_features(net, data.test, 0.05)
        expected, p = authors_adascale(h, hp, fitted_q, *percentiles, k_shift, k_correction, 10.0, variant, w, b)
        assert len(set(np.round(p, 6))) > 2  # the percentile does vary per image
        np.testing.assert_allclose(score(net, scorer, data.test).double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_adascale_pure_form_with_zero_features_and_ties(net, data):
    """Zero feature rows (the guard: r = 0, where the authors' code gives NaN), a dead unit and repeated rows."""
    g = torch.Generator().manual_seed(2)
    h = torch.rand(8, 64, generator=g) * 2
    h[:, 5] = 0.0
    h[2] = 0.0
    h[6] = h[7]
    hp = (h + 0.3 * torch.randn(8, 64, generator=g)).relu()
    w, b = net.head.weight.detach().double().numpy(), net.head.bias.detach().double().numpy()
    for variant in ("a", "l"):
        scorer = fitted(net, data, f"adascale_{variant}", shift_percent=10.0, correction_percent=20.0)
        fitted_q = scorer.fitted_shifts.double().numpy()
        expected, _ = authors_adascale(h.double().numpy(), hp.double().numpy(), fitted_q, 75.0, 85.0, 6, 12, 10.0,
                                       variant, w, b)  # fmt: skip
        ours = scorer.score_shifted(h, hp).double().numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
        assert np.isfinite(ours).all() and ours[6] == ours[7]


def test_adascale_at_one_percentile_is_scale_and_agrees_with_pytorch_ood(net, data):
    """pytorch-ood 0.4 has no AdaSCALE. With p_min = p_max = p the shift no longer matters and AdaSCALE-A is SCALE at
    p: equal to our ``scale`` and to pytorch-ood's SCALE (on the features as 1 x 1 maps); the ratio is SCALE's."""
    g = torch.Generator().manual_seed(3)
    h = (torch.rand(10, 64, generator=g) * 3 - 0.5).relu()
    hp = h + 0.1
    for p in (65.0, 85.0):
        scorer = fitted(net, data, "adascale_a", percentiles=(p, p))
        ours = scorer.score_shifted(h, hp)
        reference = pytorch_ood.SCALE(None, nn.Sequential(nn.Flatten(), net.head), percentile=p / 100)
        theirs = reference.predict_feature_maps(h.view(10, 64, 1, 1))
        torch.testing.assert_close(ours, -theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours, torch.logsumexp(net.head(scale(h, p)), dim=1).detach(), rtol=1e-5, atol=1e-5)
        ratio = adaptive_ratio(h, torch.full((10,), p))
        torch.testing.assert_close(h * torch.exp(ratio), scale(h, p), rtol=1e-5, atol=1e-6)


def test_adascale_fits_on_a_seeded_subset_and_checks_its_arguments(net, data):
    few = fitted(net, data, "adascale_a", images=6, seed=3)
    again = fitted(net, data, "adascale_a", images=6, seed=3)
    assert len(few.fitted_shifts) == 6 and torch.equal(few.fitted_shifts, again.fitted_shifts)
    assert len(fitted(net, data, "adascale_a").fitted_shifts) == len(data.fit)
    for bad in ({"percentiles": (85, 75)}, {"percentiles": (60, 100)}, {"percentiles": (70,)}, {"variant": "x"},
                {"perturbed_share": 1.5}, {"images": 0}, {"reference": "id_test"}, {"shift_weight": -1}):  # fmt: skip
        with pytest.raises(ConfigError):
            build_scorer("adascale_a", **bad)
    with pytest.raises(ConfigError, match="id_val"):
        build_scorer("adascale_a").bind(net).prepare(FitContext(net))


# ============================================================================================ NAC
def authors_logspace(base, num):
    """``coverage.py`` ``logspace``."""
    num = int(num / 2)
    x = np.linspace(1, np.sqrt(base), num=num)
    x_l = np.emath.logn(base, x)
    x_r = (1 - x_l)[::-1]
    x = np.concatenate([x_l[:-1], x_r])
    x[-1] += 1e-2
    return np.append(x, 1.2)


def authors_states(net, x, names, alphas):
    """``KMNC.assess``: outputs retained by forward (pre-)hooks of their own, ``kl_grad`` per layer, the spatial
    sums, ``sigmoid(o * g_kl)`` as ``1 / (1 + exp(-alpha x))``."""
    kept = {}
    handles = []
    for name in names:
        if name == "features":
            continue
        if name.endswith(":input"):
            module = net.get_submodule(name.removesuffix(":input"))
            handles.append(module.register_forward_pre_hook(lambda m, i, n=name: kept.__setitem__(n, i[0])))
        else:
            handles.append(
                net.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: kept.__setitem__(n, o))
            )
    try:
        features = net.features(x)
        p = net.head(features)
    finally:
        for handle in handles:
            handle.remove()
    kept["features"] = features
    targets = torch.ones_like(p) / p.shape[-1]
    loss = torch.sum(-targets * torch.log_softmax(p, dim=-1), dim=-1)
    states = []
    for j, (name, alpha) in enumerate(zip(names, alphas, strict=True)):
        grad = torch.autograd.grad(loss.sum(), kept[name], retain_graph=j < len(names) - 1)[0]
        o, g = kept[name].detach(), grad
        if o.ndim == 4:
            o, g = o.sum(dim=[2, 3]), g.sum(dim=[2, 3])
        states.append((1 / (1 + torch.exp(-alpha * (o * g)))).double().numpy())
    return states


def authors_nac(fit_states, test_states, bins, counts):
    """``Estimator.update`` / ``get_score`` / ``ood_test`` in numpy, averaged over the layers."""
    total = 0.0
    for fit, test, m, o in zip(fit_states, test_states, bins, counts, strict=True):
        thresh = authors_logspace(1e3, m)[:, None]
        lower, upper = thresh[: m - 1][None], thresh[1:m][None]
        t_act = ((fit[:, None, :] >= lower) & (fit[:, None, :] < upper)).sum(axis=0)
        coverage = np.minimum(t_act / o, 1.0)
        hit = (test[:, None, :] >= lower) & (test[:, None, :] < upper)
        total = total + (hit * coverage[None]).sum(axis=1).mean(axis=1) / len(bins)
    return total


@pytest.fixture(scope="module")
def nac_settings(net, data):
    """Steepness per layer so that the states spread over (0, 1) on these images, small M and O so that the
    coverage takes several values."""
    names = ("features", "layers.1", "layers.0", "layers.0:input")  # the default for the ResNet-20 (stages)
    scorer = fitted(net, data, "nac", bins=(4, 4, 4, 4), full_counts=(1, 1, 1, 1), alphas=(1.0, 1.0, 1.0, 1.0))
    assert scorer.layer_names == names
    products = scorer.products(data.fit, net.features)
    alphas = tuple(float(1.0 / p[p != 0].abs().median()) for p in products)
    assert all((p == 0).any() for p in products[:3])  # the dead channels: state exactly 0.5, at a threshold
    return names, alphas


@pytest.mark.parametrize("bins, counts", [((10, 20, 6, 8), (2, 3, 1, 4)), ((50, 500, 50, 500), (50, 100, 5, 100))])
def test_nac_agrees_with_the_authors_computation(net, data, nac_settings, bins, counts):
    names, alphas = nac_settings
    scorer = fitted(net, data, "nac", bins=bins, full_counts=counts, alphas=alphas)
    fit_states = authors_states(net, data.fit, names, alphas)
    test_states = authors_states(net, data.test, names, alphas)
    for m in bins:
        np.testing.assert_array_equal(nac_module.coverage_thresholds(m), authors_logspace(1e3, m))
    expected = authors_nac(fit_states, test_states, bins, counts)
    ours = score(net, scorer, data.test).double().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
    assert ours[0] == ours[-1] and len(set(np.round(ours, 6))) > 3


def test_nac_agrees_with_pytorch_ood_on_the_features_with_the_authors_bins(net, data, nac_settings, monkeypatch):
    """pytorch-ood's NACUE differs from the authors' in its bins (geometric, M of them, where the authors' intervals
    are ``logspace(1e3, M)``'s M - 1), its pooling (the spatial mean of o * g, the authors' sum of o times sum of
    g), and sums the layers (the authors average them); on one 2-D layer (the features) the pooling does not matter,
    and with its bins replaced by the authors' intervals it gives our scores (negated)."""
    _, alphas = nac_settings
    m, o_star, alpha = 20, 2, alphas[0]

    def authors_bins(z_hat, m):  # the interval of each state; the last bin (never used: states < 1.01) if none
        edges = torch.tensor(authors_logspace(1e3, m), dtype=torch.float64)
        return (torch.bucketize(z_hat.double(), edges, right=True) - 1).clamp(0, m - 1)

    monkeypatch.setattr(pytorch_ood.nac, "_bin_indices_geometric", authors_bins)
    features = nn.Module()
    features.forward = net.features
    model = nn.Sequential(features, net.head)
    detector = pytorch_ood.NACUE(model, layers=[features], m_bins=m, alpha=alpha, o_star=o_star)
    detector.fit(DataLoader(TensorDataset(data.fit), batch_size=5))
    theirs = detector.predict(data.test)
    scorer = fitted(net, data, "nac", layers=("features",), bins=(m,), full_counts=(o_star,), alphas=(alpha,))
    torch.testing.assert_close(score(net, scorer, data.test), -theirs, rtol=1e-6, atol=1e-6)


def test_nac_checks_its_arguments(net):
    for bad in ({"bins": (5, 50, 50, 50)}, {"bins": (50, 50, 50)}, {"full_counts": (0, 1, 1, 1)},
                {"alphas": (1.0, -1.0, 1.0, 1.0)}, {"images": 0}, {"layers": ("features",)}):  # fmt: skip
        with pytest.raises(ConfigError):
            build_scorer("nac", **bad).bind(net)
    with pytest.raises(ConfigError, match="not modules"):
        build_scorer("nac", layers=("nope",), bins=(4,), full_counts=(1,), alphas=(1.0,)).bind(net)
    with pytest.raises(ConfigError, match="training images"):
        build_scorer("nac").bind(net).prepare(FitContext(net))


# ============================================================================================ engine, dtype, device
def test_through_the_engine_then_on_float64_and_meta(net, data):
    """The engine fits the three with one context and scores them on the inputs; the fitted tensors then follow the
    engine to float64 (where the scores agree) and to the meta device."""
    network = copy.deepcopy(net)  # the engine's own: it goes to float64 and to meta
    context = FitContext(network, training_images=lambda count, seed: data.loader,
                         reference_images=lambda ref: data.loader, log=lambda message: None)  # fmt: skip
    engine = Engine(network, ["adascale_a", "adascale_l", "nac"]).fit(data.stats, context)
    _, scores = engine(data.test)
    for name in ("adascale_a", "nac"):
        torch.testing.assert_close(scores[name], score(net, fitted(net, data, name), data.test), msg=name)
    assert all(torch.isfinite(s).all() and s.shape == (len(data.test),) for s in scores.values())
    engine.double()
    _, scores64 = engine(data.test.double())
    for name, values in scores64.items():
        assert values.dtype == torch.float64, name
        torch.testing.assert_close(values, scores[name].double(), rtol=1e-4, atol=1e-4, msg=name)
    buffers = [t for s in engine.fitted().values() for t in s.buffers()]
    assert buffers and all(t.dtype == torch.float64 for t in buffers if t.is_floating_point())
    engine.to("meta")
    assert all(t.device.type == "meta" for s in engine.fitted().values() for t in s.buffers())
