"""AdaSCALE-A / AdaSCALE-L (Regmi, arXiv 2025; lightning_ood/scoring/adascale.py) against an independent
computation written here from the authors' code (OpenOOD ``adascale_postprocessor.py`` / ``adascale_net.py``) on
a small random ResNet-20 with ties (repeated images) and zeros (dead channels, zero features); pytorch-ood 0.4 has
no AdaSCALE, whose limit p_min = p_max is SCALE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

from lightning_ood.engine import FitContext
from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.activation import scale
from lightning_ood.scoring.adascale import adaptive_ratio
from tests.scoring.conftest import fitted_on_the_network as fitted
from tests.scoring.conftest import score

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


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
