"""NAC-UE (Liu et al., ICLR 2024; lightning_ood/scoring/nac.py) against an independent computation written here from
the authors' code (BierOne/ood_coverage ``nac/coverage.py``, ``nac/utils.py``, ``nac/instr_state.py``) on a small
random ResNet-20 with ties and zeros, against pytorch-ood 0.4's NACUE, and (with AdaSCALE) through the engine, on
float64 and meta."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ood.scoring.nac as nac_module
from lightning_ood.engine import Engine, FitContext
from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from tests.scoring.conftest import fitted_on_the_network as fitted
from tests.scoring.conftest import score

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


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
