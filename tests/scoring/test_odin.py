"""ODIN, alone and on a base scorer's logits (lightning_ood/scoring/odin.py), against torch autograd by hand: the
perturbed input and the score."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from tests.references import ref_class_means
from tests.scoring.conftest import STD, TinyNet

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


@pytest.fixture(scope="module")
def odin_setup():
    torch.manual_seed(0)
    net = TinyNet().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    train_x = torch.randn(32, 3, 8, 8)
    labels = torch.arange(32) % 4
    with torch.no_grad():
        train_h = net.features(train_x)
    test_x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        test_h = net.features(test_x)
        features_logits = (test_h, net.head(test_h))  # what the engine's Batch carries beside the inputs
    return SimpleNamespace(net=net, train_x=train_x, train_h=train_h, labels=labels, x=test_x,
                           features_logits=features_logits)  # fmt: skip


def ref_odin(x, features_fn, logits_fn, temperature, epsilon, std):
    """Returns (perturbed input, score) computed step by step."""
    x = x.detach().clone().requires_grad_(True)
    out = logits_fn(features_fn(x)) / temperature
    loss = F.cross_entropy(out, out.argmax(1))
    (grad,) = torch.autograd.grad(loss, x)
    sign = torch.sign(grad)
    sign[sign == 0] = 1.0  # a zero gradient counts as +1
    if std is not None:
        for ch in range(x.shape[1]):
            sign[:, ch] = sign[:, ch] / std[ch]
    perturbed = x.detach() - epsilon * sign
    with torch.no_grad():
        logits = logits_fn(features_fn(perturbed)).double()
    return perturbed, F.log_softmax(logits / temperature, dim=1).max(dim=1).values  # log MSP, as ODIN scores


class Recorder:
    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x):
        self.inputs.append(x.detach().clone())
        return self.fn(x)


def plain_logits(net):
    return lambda h: h @ net.head.weight.T + net.head.bias


@pytest.mark.parametrize(
    ("temperature", "epsilon", "scale_by_std"), [(1000.0, 0.05, True), (1000.0, 0.05, False), (10.0, 0.0014, True)]
)
def test_odin_matches_manual_autograd(odin_setup, temperature, epsilon, scale_by_std):
    s = odin_setup
    odin = build_scorer("odin", temperature=temperature, epsilon=epsilon, scale_by_std=scale_by_std)
    odin.fit(s.train_h, s.labels, s.net.head)
    recorder = Recorder(s.net.features)
    scores = odin(Batch(*s.features_logits, inputs=s.x, features_of=recorder, std=STD))
    std = STD if scale_by_std else None
    perturbed, expected = ref_odin(s.x, s.net.features, plain_logits(s.net), temperature, epsilon, std)
    assert scores.shape == (6,) and scores.dtype == torch.float64
    torch.testing.assert_close(recorder.inputs[-1], perturbed, rtol=0, atol=1e-6)
    delta = s.x - recorder.inputs[-1]
    scale = torch.tensor(std if std else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
    torch.testing.assert_close(delta[:, 2], torch.full_like(delta[:, 2], epsilon / scale[0, 2, 0, 0].item()))  # 0 -> +1
    torch.testing.assert_close((delta * scale / epsilon).abs(), torch.ones_like(delta))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-9)
    unperturbed = F.log_softmax(plain_logits(s.net)(s.net.features(s.x)).double() / temperature, 1).amax(1)
    assert (scores > unperturbed).all()  # stepping down the CE gradient raises the max softmax


def test_odin_std_scaling_changes_the_score(odin_setup):
    s = odin_setup
    scores = {}
    for flag in (True, False):
        odin = build_scorer("odin", epsilon=0.05, scale_by_std=flag).fit(s.train_h, s.labels, s.net.head)
        scores[flag] = odin(Batch(*s.features_logits, inputs=s.x, features_of=s.net.features, std=STD))
    assert (scores[True] - scores[False]).abs().max() > 1e-7
    with pytest.raises(ValueError, match="std"):
        odin = build_scorer("odin").fit(s.train_h, s.labels, s.net.head)
        odin(Batch(*s.features_logits, inputs=s.x, features_of=s.net.features))


def torch_fmls_logits(W, b, prototypes, p, clip):
    """Differentiable reference of the paper's logits; the mask thresholds from np.percentile."""
    W64 = W.detach().double().numpy()
    mask = torch.tensor(np.stack([W64[c] >= np.percentile(W64[c], p) for c in range(len(W64))]), dtype=W.dtype)
    protos = torch.as_tensor(prototypes, dtype=W.dtype)

    def logits(h):
        c = (h @ W.T + b).argmax(1)
        out = torch.clamp(h * mask[c], max=clip) @ W.T + b
        cos = (h * protos[c]).sum(1) / (h.norm(dim=1) * protos[c].norm(dim=1))
        return out * cos[:, None]

    return logits


@pytest.mark.parametrize("name", ["odin_fmls", "odin_react"])
def test_odin_on_a_base_scorer_uses_its_logits_in_both_passes(odin_setup, name):
    s = odin_setup
    W, b = s.net.head.weight, s.net.head.bias
    train64 = s.train_h.double().numpy()
    if name == "odin_react":
        t = np.percentile(train64.ravel(), 90)
        logits_fn = lambda h: torch.clamp(h, max=t) @ W.T + b  # noqa: E731
        kwargs = {}
    else:
        kwargs = {"percentile": 50, "clip": 0.5}
        logits_fn = torch_fmls_logits(W, b, ref_class_means(train64, s.labels.numpy(), 4), 50, 0.5)
    odin = build_scorer(name, epsilon=0.05, **kwargs).fit(s.train_h, s.labels, s.net.head)
    recorder = Recorder(s.net.features)
    scores = odin(Batch(*s.features_logits, inputs=s.x, features_of=recorder, std=STD))
    perturbed, expected = ref_odin(s.x, s.net.features, logits_fn, 1000.0, 0.05, STD)
    torch.testing.assert_close(recorder.inputs[-1], perturbed, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-9)
    # Plain-head logits in either pass would give different scores.
    _, plain = ref_odin(s.x, s.net.features, plain_logits(s.net), 1000.0, 0.05, STD)
    with torch.no_grad():
        plain_second_pass = F.log_softmax(plain_logits(s.net)(s.net.features(perturbed)).double() / 1000.0, 1).amax(1)
    assert (scores - plain).abs().max() > 1e-7
    assert (scores - plain_second_pass).abs().max() > 1e-7


def test_odin_under_inference_mode(odin_setup):
    s = odin_setup
    odin = build_scorer("odin_fmls", epsilon=0.05).fit(s.train_h, s.labels, s.net.head)
    outside = odin(Batch(*s.features_logits, inputs=s.x, features_of=s.net.features, std=STD))
    with torch.inference_mode():
        x = s.x.clone()
        assert x.is_inference()
        inside = odin(Batch(*s.features_logits, inputs=x, features_of=s.net.features, std=STD))
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_odin_score_without_inputs_is_refused(odin_setup):
    """ODIN reads the inputs: scoring features alone, or a Batch without inputs, says so."""
    s = odin_setup
    odin = build_scorer("odin").fit(s.train_h, s.labels, s.net.head)
    with pytest.raises(NotImplementedError, match="Batch"):
        odin.score(s.train_h, s.net.head(s.train_h))
    with pytest.raises(ValueError, match="inputs"):
        odin(Batch(s.train_h, s.net.head(s.train_h)))
