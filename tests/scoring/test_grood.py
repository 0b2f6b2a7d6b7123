"""GrOOD (ElAraby et al., TMLR 2025; lightning_ood/scoring/grood.py) against OpenOOD's ``GrOODPostprocessor``, which
its authors contributed, re-implemented here with autograd (pytorch-ood 0.4 has no GrOOD)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ood.engine import FitContext
from lightning_ood.errors import ConfigError
from lightning_ood.models import build_backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.grood import NOISE_BATCH, NOISE_KEPT
from lightning_ood.statistics import FeatureStatistics
from tests.scoring.conftest import fitted64, in_float64, toy_problem_in_the_bank


@pytest.fixture(scope="module")
def p():
    """The toy problem of these tests: ``toy_problem_in_the_bank``."""
    return toy_problem_in_the_bank()


def grood_reference(train, labels, head, test, num_classes, batch=64, ood=None):
    """OpenOOD's ``GrOODPostprocessor`` (grood.py): running-mean class prototypes (lines 918-951), the OOD prototype
    as the mean of the class prototypes (lines 214-219) or given, per-sample autograd of the nearest-class-prototype
    cross-entropy w.r.t. the OOD prototype (lines 696-745, 786-846), the correctly classified training gradients
    indexed, and minus the squared L2 distance to the nearest (lines 871-872; a flat index: exact)."""
    prototypes = torch.zeros(num_classes, train.shape[1], dtype=train.dtype)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for start in range(0, len(train), batch):
        h, y = train[start : start + batch], labels[start : start + batch]
        for c in y.unique():
            rows = y == c
            prototypes[c] = (h[rows].sum(0) + counts[c] * prototypes[c]) / (counts[c] + rows.sum())
            counts[c] += rows.sum()
    noise = prototypes.mean(0) if ood is None else ood.clone()

    def gradients(h, keep):
        # one copy of the OOD prototype per sample: the gradient of the summed losses w.r.t. copy i is sample i's
        # (their loop of torch.autograd.grad(loss[i], noise_proto), lines 824-838, in one call)
        noise_proto = noise.expand(len(h), -1).clone().requires_grad_(True)
        protos = torch.cat([prototypes.expand(len(h), -1, -1), noise_proto[:, None, :]], dim=1)  # (N, C + 1, L)
        with torch.no_grad():
            pseudo = head(h).argmax(1)
        ncc = -torch.norm(h.reshape(len(h), 1, -1) - protos, dim=2)
        loss = F.cross_entropy(ncc, pseudo, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), noise_proto)
        return grad[keep].numpy()

    with torch.no_grad():
        right = head(train).argmax(1) == labels
    index = gradients(train, right)
    queries = gradients(test, torch.ones(len(test), dtype=torch.bool))
    return -((queries[:, None, :] - index[None, :, :]) ** 2).sum(-1).min(1)


def test_grood_matches_the_authors_postprocessor(p):
    head = copy.deepcopy(p.head).double()
    expected = grood_reference(p.train.double(), p.labels, head, p.test.double(), p.C)
    scores = in_float64(fitted64(p, "grood"), p.test, p.head)
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-10)


def test_grood_noise_prototype():
    """``ood_prototype: noise`` (the authors' ``get_uniform_noise``): blurred uniform images fed unnormalised, the 10
    lowest-energy ones of each 100 averaged; the scorer then matches the reference with that prototype."""
    from torchvision.transforms.functional import gaussian_blur

    torch.manual_seed(0)
    network = build_backbone("resnet20", 4).eval()
    images, labels = torch.randn(40, 3, 32, 32), torch.arange(40) % 4
    loader = torch.utils.data.DataLoader(list(zip(images, labels, torch.arange(40), strict=True)), batch_size=8)
    context = FitContext(network, training_images=lambda count, seed: loader)
    scorer = build_scorer("grood", ood_prototype="noise", noise_images=150).prepare(context)
    generator, kept = torch.Generator().manual_seed(0), []
    for _ in range(2):  # ceil(150 / 100) draws of 100
        x = torch.rand((NOISE_BATCH, 3, 32, 32), generator=generator)
        sigma = 0.2 + 4.8 * float(torch.rand((), generator=generator, dtype=torch.float64))
        with torch.no_grad():
            h = network.features(gaussian_blur(x, [5, 7], [sigma, sigma]))
            energy = torch.logsumexp(network.head(h), 1)
        kept.append(h[energy.argsort()[:NOISE_KEPT]])
    torch.testing.assert_close(scorer.noise.float(), torch.cat(kept).mean(0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        train, test = network.features(images), network.features(torch.randn(6, 3, 32, 32))
    stats = FeatureStatistics.from_features(train, labels, 4, network.head)
    scorer.fit_statistics(stats, network.head)
    head = copy.deepcopy(network.head).double()
    expected = grood_reference(train.double(), labels, head, test.double(), 4, ood=scorer.noise.double())
    np.testing.assert_allclose(in_float64(scorer, test, head), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match="noise"):
        build_scorer("grood", ood_prototype="noise").prepare(FitContext(nn.Linear(2, 2)))
