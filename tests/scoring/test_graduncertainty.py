"""GradUncertainty and its head-only variant (Lee & AlRegib, ICIP 2020; lightning_ood/scoring/graduncertainty.py)
against plain torch autograd and pytorch-ood 0.4's ``GradUncertainty``.
pytorch-ood 0.4's scores are outlier scores (higher = OOD): ours are their negatives, up to the factors each test
names."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from tests.scoring.conftest import close, theirs, toy_problem_with_unit_statistics

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_with_unit_statistics``."""
    return toy_problem_with_unit_statistics()


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
    gradients in a test (the registered scorer runs on a ResNet-20 in ``tests/scoring/test_registry.py``)."""

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
