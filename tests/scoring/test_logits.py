"""The scorers of lightning_ood/scoring/logits.py (GradNorm, KL matching, GEN, entropy, temperature scaling) against
autograd, numpy and scipy, and against pytorch-ood 0.4; KL matching's templates and temperature scaling's T
fitted on held-out ID images as their authors fit them (gpleiss/temperature_scaling, OpenOOD's
``temp_scaling_postprocessor.py`` and ``kl_matching_postprocessor.py``).
pytorch-ood 0.4's scores are outlier scores (higher = OOD): ours are their negatives, up to the factors each test
names."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from scipy.stats import entropy
from torch import nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from lightning_ood.statistics import ReferenceSet
from tests.scoring.conftest import close, ours, theirs, toy_problem_with_unit_statistics

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def test_gradnorm_equals_the_autograd_definition(p):
    expected = []
    for h in p.test:
        head = nn.Linear(p.L, p.C)
        head.load_state_dict(p.head.state_dict())
        log_p = F.log_softmax(head(h[None]), dim=1)
        loss = -(log_p / p.C).sum()  # KL(uniform || p) up to a constant
        loss.backward()
        expected.append(head.weight.grad.abs().sum().item())
    close(ours(p, "gradnorm"), expected, rtol=1e-5)
    # OpenOOD sums the per-class cross-entropies (no 1/C): every score times C, the same order
    close(ours(p, "gradnorm") * p.C, np.array(expected) * p.C, rtol=1e-5)


def test_klm(p):
    probs = softmax(p.X @ p.W.T + p.b, axis=1)
    predicted = probs.argmax(1)
    templates = np.stack([probs[predicted == c].mean(0) if (predicted == c).any() else np.eye(p.C)[c]
                          for c in range(p.C)])  # fmt: skip
    test_p = softmax(p.T @ p.W.T + p.b, axis=1)
    expected = -np.array([min(entropy(q, t) for t in templates) for q in test_p])
    close(ours(p, "klm", reference="train"), expected, rtol=1e-5, atol=1e-7)
    reference = pytorch_ood.KLMatching(None).fit_logits(p.train_logits, p.labels).predict_logits(p.logits)
    close(ours(p, "klm", reference="train"), -theirs(reference), rtol=1e-4, atol=1e-6)
    # templates from held-out ID images (reference: id_val, the default), the authors' choice
    p.stats.reference["id_val"] = ReferenceSet(p.train[:100], p.train_logits[:100], p.labels[:100])
    probs = softmax((p.X @ p.W.T + p.b)[:100], axis=1)
    predicted = probs.argmax(1)
    templates = np.stack([probs[predicted == c].mean(0) if (predicted == c).any() else np.eye(p.C)[c]
                          for c in range(p.C)])  # fmt: skip
    close(ours(p, "klm"), -np.array([min(entropy(q, t) for t in templates) for q in test_p]), 1e-5)


@pytest.mark.parametrize(("gamma", "top"), [(0.1, 100), (0.5, 3)])
def test_gen_and_entropy(p, gamma, top):
    probs = softmax(p.T @ p.W.T + p.b, axis=1)  # the authors' benchmark.py: no clipping
    m = min(top, p.C)
    best = np.sort(probs, axis=1)[:, ::-1][:, :m]
    close(ours(p, "gen", gamma=gamma, top=top), -(best**gamma * (1 - best) ** gamma).sum(1), rtol=1e-6)
    # pytorch-ood clips p to [1e-7, 1 - 1e-7] (the authors do not): the same numbers where nothing is clipped
    mild = p.logits.double() / 8
    assert float(mild.softmax(1).min()) > 1e-7 and float(mild.softmax(1).max()) < 1 - 1e-7
    reference = pytorch_ood.GEN(None, gamma=gamma, M=m).predict_logits(mild)  # float64, as ours
    gen = build_scorer("gen", gamma=gamma, top=top).fit_statistics(p.stats, p.head)
    close(gen.score(p.test, mild).double().numpy(), -m * theirs(reference), rtol=1e-4)  # pytorch-ood: the mean
    exact = softmax(p.T @ p.W.T + p.b, axis=1)
    close(ours(p, "entropy"), (exact * np.log(exact)).sum(1), rtol=1e-5, atol=1e-8)  # float32 scores
    entropy_theirs = pytorch_ood.Entropy(None).predict_logits(p.logits.double())  # p clipped at 1e-7 there
    close(ours(p, "entropy"), -theirs(entropy_theirs), rtol=1e-4, atol=1e-5)


def test_temperature_scaling_finds_the_nll_minimum(p):
    logits, labels = (p.X @ p.W.T + p.b)[:200] * 3, p.y[:200]  # overconfident: T > 1
    p.stats.reference["id_val"] = ReferenceSet(p.train[:200], torch.tensor(logits).float(), p.labels[:200])

    def nll(t):
        z = logits / t
        return -(z[np.arange(len(z)), labels] - logsumexp(z, axis=1)).mean()

    best = minimize_scalar(nll, bounds=(1e-3, 100), method="bounded", options={"xatol": 1e-10}).x
    scorer = build_scorer("temp_scaling").fit_statistics(p.stats, p.head)
    assert scorer.temperature == pytest.approx(best, rel=1e-5) and scorer.temperature > 1
    expected = softmax((p.T @ p.W.T + p.b) / best, axis=1).max(1)
    close(np.exp(scorer.score(p.test, p.logits).double().numpy()), expected, 1e-5)  # it scores log p_max


@pytest.fixture(scope="module")
def problem_with_unit_statistics():
    """The toy problem of test_pytorch_ood_gradnorm_formerly_gradnormkl_is_our_gradnorm:
    ``toy_problem_with_unit_statistics`` (its test features end with an all-zero one)."""
    return toy_problem_with_unit_statistics()


@pytest.fixture
def p(p, request):
    """The toy problem of tests/conftest.py, but for the one test written on ``toy_problem_with_unit_statistics``."""
    if request.function.__name__ == "test_pytorch_ood_gradnorm_formerly_gradnormkl_is_our_gradnorm":
        return request.getfixturevalue("problem_with_unit_statistics")
    return p


def test_pytorch_ood_gradnorm_formerly_gradnormkl_is_our_gradnorm(p):
    """pytorch-ood 0.4's ``GradNorm`` is its former ``GradNormKL`` (renamed in 0.4.0; its old ``GradNorm`` is now
    ``GradUncertainty``); on the head's weight, as Huang et al., it is our ``gradnorm``, sign aside."""
    head = copy.deepcopy(p.head).double()
    reference = pytorch_ood.GradNorm(head, param_filter=lambda n: n == "weight").predict(p.test.double())
    close(ours(p, "gradnorm"), -theirs(reference), rtol=1e-5, atol=1e-7)


def test_temperature_scaling_fits_t_on_the_held_out_images(q):
    """gpleiss/temperature_scaling ``temperature_scaling.py`` ``set_temperature(valid_loader)`` and OpenOOD's
    ``temp_scaling_postprocessor.py`` (``setup``: the ``id_loader_dict['val']`` logits): T minimises the mean NLL
    of ``logits / T`` over the validation images; the score is the max softmax at T."""
    z = q.val @ q.W.T + q.b

    def nll(t):
        s = z / t
        return -(s[np.arange(len(s)), q.val_y] - logsumexp(s, axis=1)).mean()

    t = minimize_scalar(nll, bounds=(1e-3, 100.0), method="bounded", options={"xatol": 1e-10}).x
    scorer = build_scorer("temp_scaling").fit_statistics(q.stats, q.head)  # the default reference: id_val
    assert scorer.reference == "id_val" and scorer.temperature == pytest.approx(t, rel=1e-5) and t > 1
    expected = softmax((q.T @ q.W.T + q.b) / t, axis=1).max(1)
    np.testing.assert_allclose(np.exp(ours(q, "temp_scaling")), expected, rtol=1e-5)  # it scores log p_max
    with pytest.raises(ConfigError, match="reference must be one of id_val, got 'id_test'"):
        build_scorer("temp_scaling", reference="id_test")  # scored images never choose T


def test_kl_matching_templates_come_from_the_held_out_images(q):
    """OpenOOD's ``kl_matching_postprocessor.py``: per class predicted on the ID validation images the mean softmax
    (a one-hot template for a class never predicted), then ``-min_c KL(p || d_c)`` (scipy's entropy) per image."""
    p_val = softmax(q.val @ q.W.T + q.b, axis=1)
    predicted = p_val.argmax(1)
    templates = [p_val[predicted == c].mean(0) if (predicted == c).any() else np.eye(q.C)[c] for c in range(q.C)]
    p_test = softmax(q.T @ q.W.T + q.b, axis=1)
    expected = -np.array([min(entropy(p, t) for t in templates) for p in p_test])
    np.testing.assert_allclose(ours(q, "klm"), expected, rtol=1e-5, atol=1e-8)
    assert np.abs(ours(q, "klm", reference="train") - expected).max() > 1e-3  # the training images' templates differ
