"""iODIN (Regmi, arXiv 2024; lightning_ood/scoring/iodin.py) against OpenOOD's ``IODINPostprocessor``, which its
author contributed, re-implemented here (pytorch-ood 0.4 has no iODIN)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from tests.scoring.conftest import STD, TinyNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = TinyNet().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        h = model.features(torch.randn(32, 3, 8, 8))
    return SimpleNamespace(net=model, x=x, train_h=h, labels=torch.arange(32) % 4)


def iodin_reference(net, data, temperature, noise, std):
    """OpenOOD's ``IODINPostprocessor.postprocess`` (iodin_postprocessor.py lines 14-55), in float64."""
    net = net.double()
    data = data.double().clone().requires_grad_(True)
    output = net.head(net.features(data))
    labels = output.detach().argmax(axis=1)
    loss = nn.CrossEntropyLoss()(output / temperature, labels)
    loss.backward()
    grad = data.grad.detach()
    batch_size = grad.shape[0]
    mask = torch.zeros_like(grad.abs().view(batch_size, -1), dtype=torch.uint8)
    mask.scatter_(1, torch.argmax(grad.abs().view(batch_size, -1), dim=1, keepdim=True), 1)
    mask = mask.view_as(grad)
    gradient = (torch.ge(grad, 0).double() - 0.5) * 2
    for channel in range(3):
        gradient[:, channel] = gradient[:, channel] / std[channel]
    moved = torch.add(data.detach(), gradient * mask, alpha=-noise)
    with torch.no_grad():
        out = net.head(net.features(moved)) / temperature
        out = out - out.max(dim=1, keepdims=True).values
        conf = (out.exp() / out.exp().sum(dim=1, keepdims=True)).max(dim=1).values
    net.float()
    return moved, conf


@pytest.mark.parametrize(("temperature", "epsilon"), [(1000.0, 0.0014), (1000.0, 0.05), (10.0, 0.05)])
def test_iodin_matches_the_authors_postprocessor(net, temperature, epsilon):
    scorer = build_scorer("iodin", temperature=temperature, epsilon=epsilon).fit(net.train_h, net.labels, net.net.head)
    seen = []

    def features_of(x):
        seen.append(x.detach().clone())
        return net.net.features(x)

    with torch.no_grad():
        h = net.net.features(net.x)
    scores = scorer(Batch(h, net.net.head(h), inputs=net.x, features_of=features_of, std=STD))
    moved, expected = iodin_reference(net.net, net.x, temperature, epsilon, STD)
    # iodin scores log p_max (ODIN's MSP as its logarithm: the same order)
    np.testing.assert_allclose(scores.double().numpy(), np.log(expected.numpy()), rtol=1e-6, atol=1e-7)
    delta = (net.x - seen[-1]).flatten(1)
    assert ((delta != 0).sum(dim=1) == 1).all()  # one input value per image, as the reference
    np.testing.assert_allclose(seen[-1].double().numpy(), moved.numpy(), atol=1e-6)
    odin = build_scorer("odin", temperature=temperature, epsilon=epsilon).fit(net.train_h, net.labels, net.net.head)
    whole = odin(Batch(h, net.net.head(h), inputs=net.x, features_of=net.net.features, std=STD))
    assert not torch.equal(whole, scores)  # ODIN steps every value


def test_iodin_direction_keeps_the_first_largest_gradient_and_counts_zero_as_plus_one():
    grad = torch.zeros(3, 3, 2, 2)
    grad[0, 1, 0, 1], grad[0, 2, 1, 1] = -5.0, 5.0  # a tie in |grad|: the first in (channel, row, column) order
    grad[1, 0, 0, 0] = 1e-3  # the largest |grad| is small and positive
    # image 2: every gradient zero -> the first value, stepped as +1 (torch.ge(0, 0) in the authors' code)
    step = build_scorer("iodin").direction(grad)
    expected = torch.zeros_like(grad)
    expected[0, 1, 0, 1], expected[1, 0, 0, 0], expected[2, 0, 0, 0] = -1.0, 1.0, 1.0
    torch.testing.assert_close(step, expected)
