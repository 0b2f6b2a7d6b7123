"""iODIN, GMM, CF-OOD and GrOOD (OpenOOD's ``iodin``, ``gmm``, ``cfood``, ``grood``), each against a re-implementation
written here from its authors' code (OpenOOD's postprocessors, which the authors of iODIN, CF-OOD and GrOOD
contributed; sklearn's PCA and GaussianMixture, which OpenOOD's GMM calls) on random features with ties and zeros.

pytorch-ood 0.4 has none of iODIN, CF-OOD or GrOOD. Its ``GMM`` is another method: one Gaussian per class with its own
covariance, fitted from the labels (no EM, no projection), its negative log-likelihood with the constants; OpenOOD's
fits a tied mixture by EM without labels on PCA-projected features, and so do we.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from torch import nn

from lightning_ood.engine import FitContext
from lightning_ood.errors import ConfigError, FitError
from lightning_ood.models import build_backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.cfood import kappa_grid
from lightning_ood.scoring.gmm import fit_tied_gmm, kmeans_labels
from lightning_ood.scoring.grood import NOISE_BATCH, NOISE_KEPT
from lightning_ood.statistics import Bank, FeatureStatistics
from tests.conftest import toy_features
from tests.test_scoring import STD, TinyNet

NEW = ("iodin", "gmm", "cfood", "grood")


@pytest.fixture(scope="module")
def p():
    """Training features exactly representable in float16 (the bank equals them), ties (repeated rows), zeros (a dead
    unit, an all-zero row), a head that classifies most of them right, and test features near and far."""
    L, C, N = 12, 5, 400
    labels, train, head, near, far = toy_features(L, C, N)
    train[7] = 0.0  # a zero feature
    train = train.half().float()
    test = torch.cat([near, far])
    stats = FeatureStatistics.from_features(train, labels, C, head)
    return SimpleNamespace(L=L, C=C, N=N, train=train, labels=labels, head=head, test=test, stats=stats)


def fitted(p, name, **kwargs):
    return build_scorer(name, **kwargs).fit_statistics(p.stats, p.head)


def fitted64(p, name, **kwargs):
    """Fitted with a float64 head: the scorer's fitted tensors in float64 from the start (the algorithm, not float32
    rounding, as the references compute it)."""
    return build_scorer(name, **kwargs).fit_statistics(p.stats, copy.deepcopy(p.head).double())


def in_float64(scorer, features, head):
    """The scorer's scores in float64 (its fitted tensors cast by ``double()``): the algorithm, not float32 rounding."""
    scorer, head = scorer.double(), copy.deepcopy(head).double()
    with torch.no_grad():
        h = features.double()
        return scorer.score(h, head(h)).numpy()


# ============================================================================================ iODIN


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


# ============================================================================================ GMM
def openood_gmm_score(z, gm) -> np.ndarray:
    """OpenOOD's ``compute_GMM_score`` (gmm_postprocessor.py lines 152-163) + ``log(. + 1e-45)`` (line 55), float64."""
    terms = []
    for mean in gm.means_:
        zero_f = z - mean
        terms.append(np.exp(-0.5 * ((zero_f @ gm.precisions_) * zero_f).sum(1)))
    return np.log(np.stack(terms, 1) @ gm.weights_ + 1e-45)


def sklearn_initial_parameters(z, labels, k, reg=1e-6):
    """sklearn's ``GaussianMixture._initialize`` from one-hot responsibilities (tied), as numpy."""
    resp = np.eye(k)[labels]
    nk = resp.sum(0) + 10 * np.finfo(resp.dtype).eps
    means = resp.T @ z / nk[:, None]
    covariance = (z.T @ z - (nk * means.T) @ means) / nk.sum() + reg * np.eye(z.shape[1])
    return nk / len(z), means, np.linalg.inv(covariance)


def test_gmm_em_matches_sklearn_from_the_same_start(p):
    """OpenOOD's fit (PCA, then sklearn's tied GaussianMixture) started from our k-means labels: the same mixture and
    the same scores as ours (ours projects on the covariance's eigenvectors: sklearn's axes up to signs)."""
    components, dim = 6, 8
    x = p.train.double().numpy()
    axes = PCA(n_components=dim).fit(x).components_.T  # OpenOOD's reduce_feature_dim('pca_8')
    z = x @ axes
    labels = kmeans_labels(torch.tensor(z), components, seed=0).numpy()
    weights, means, precision = sklearn_initial_parameters(z, labels, components)
    gm = GaussianMixture(components, covariance_type="tied", random_state=0, weights_init=weights,
                         means_init=means, precisions_init=precision).fit(z)  # fmt: skip
    ours_w, ours_mu, chol = fit_tied_gmm(torch.tensor(z), torch.tensor(labels), components)
    np.testing.assert_allclose(ours_w.numpy(), gm.weights_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours_mu.numpy(), gm.means_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose((chol @ chol.T).numpy(), gm.precisions_, rtol=1e-5, atol=1e-6)
    expected = openood_gmm_score(p.test.double().numpy() @ axes, gm)
    scores = in_float64(fitted64(p, "gmm", components=components, dim=dim), p.test, p.head)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)


def blobs(seed=0, k=4, per=60, dim=10):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 40, (k, dim))
    labels = np.arange(k * per) % k
    return (centres[labels] + rng.normal(0, 1, (k * per, dim))).astype(np.float16).astype(np.float64), labels, centres


def test_gmm_end_to_end_equals_openood_on_separated_clusters():
    """OpenOOD's whole pipeline (sklearn's own k-means, random_state=0) and ours (our seeded k-means++) find the same
    partition of well-separated clusters, hence the same mixture and scores; beyond OpenOOD's float floor (its sum
    below 1e-45) ours keep their order."""
    x, labels, centres = blobs()
    head = nn.Linear(10, 4)
    stats = FeatureStatistics.from_features(torch.tensor(x).float(), torch.tensor(labels), 4, head)
    rng = np.random.default_rng(1)
    near = centres[np.arange(20) % 4] + rng.normal(0, 1.5, (20, 10))
    far = centres[0] + np.linspace(5, 40, 8)[:, None] * np.ones(10) / np.sqrt(10)  # moving away from a cluster
    test = np.concatenate([near, far])
    axes = PCA(n_components=6).fit(x).components_.T
    gm = GaussianMixture(4, covariance_type="tied", random_state=0).fit(x @ axes)
    expected = openood_gmm_score(test @ axes, gm)
    scorer = build_scorer("gmm", components=4, dim=6).fit_statistics(stats, head)
    scores = in_float64(scorer, torch.tensor(test), head)
    above_floor = expected > np.log(1e-30)
    assert above_floor[:20].all() and not above_floor.all()
    np.testing.assert_allclose(scores[above_floor], expected[above_floor], rtol=1e-6, atol=1e-6)
    assert (np.diff(scores[20:]) < 0).all()  # farther -> lower, also where OpenOOD's scores all tie at its floor
    ours_labels = kmeans_labels(torch.tensor(x @ axes), 4).numpy()
    theirs = KMeans(4, n_init=1, random_state=0).fit(x @ axes).labels_
    assert len(set(zip(ours_labels, theirs, strict=True))) == 4  # the same partition, up to the cluster names


def test_gmm_with_more_clusters_than_groups_and_its_guards(p):
    """Empty-cluster relocation and many components on few points stay finite; more axes than units keep them all."""
    scores = fitted(p, "gmm", components=40, dim=12).score(p.test, p.head(p.test))
    assert torch.isfinite(scores).all()
    labels = kmeans_labels(torch.tensor(p.train.double().numpy()), 40)
    assert len(labels.unique()) == 40  # every cluster holds points
    all_axes, unprojected = fitted(p, "gmm"), fitted(p, "gmm", dim=None)  # 50 axes of 12-d features: all 12
    logits = p.head(p.test)
    torch.testing.assert_close(all_axes.score(p.test, logits), unprojected.score(p.test, logits))
    small = FeatureStatistics.from_features(p.train[:30], p.labels[:30], p.C, p.head)
    with pytest.raises(FitError, match="50 mixture components need at least 50 training features in the bank, which "
                                       "holds 30: lower components to at most 30"):  # fmt: skip
        build_scorer("gmm", components=50, dim=4).fit_statistics(small, p.head)  # never fewer components than asked
    few = build_scorer("gmm", components=30, dim=4).fit_statistics(small, p.head)
    assert few.centres.shape == (30, 4) and torch.isfinite(few.score(p.test, p.head(p.test))).all()


# ============================================================================================ CF-OOD
def cfood_reference(train, test, alpha, k, seed=0):
    """OpenOOD's ``CFOODPostprocessor`` (cfood_postprocessor.py lines 94-178), float64 features, the reference set
    drawn with our seeded permutation (theirs is unseeded)."""
    feats = train / (torch.norm(train, dim=1, keepdim=True) + 1e-10)
    total = feats.size(0)
    n = int(alpha * total) if alpha < 1.0 else total
    ref = feats[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]] if alpha < 1.0 else feats
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knndst = torch.zeros((n, len(kpos)), dtype=train.dtype)
    for i in range(n):
        knndst[i, :] = torch.sort(torch.sum((ref[i] - ref) ** 2, dim=1)).values[kpos + 1]
    scores = []
    for v in test / (torch.norm(test, dim=1, keepdim=True) + 1e-10):
        dst = torch.sum((v - ref) ** 2, dim=1)
        count = (knndst >= dst.view(n, 1)).sum(dim=0).float() / float(n)
        pos = torch.nonzero(count >= k, as_tuple=False)
        scores.append(kval[pos[0, 0]] if pos.numel() > 0 else 1.0)
    return -np.array(scores)


@pytest.mark.parametrize(("alpha", "k"), [(0.1, 0.01), (0.5, 0.05), (1.0, 0.001), (1.0, 0.3)])
def test_cfood_matches_the_authors_postprocessor(p, alpha, k):
    scores = in_float64(fitted64(p, "cfood", alpha=alpha, k=k), p.test, p.head)
    np.testing.assert_array_equal(scores, cfood_reference(p.train.double(), p.test.double(), alpha, k))
    assert len(np.unique(scores)) > 3  # a coarse score, but not a constant one


def test_cfood_scores_in_chunks_and_float32_as_a_whole(p, monkeypatch):
    import lightning_ood.scoring.cfood as cfood

    whole = fitted(p, "cfood", alpha=1.0).score(p.test, p.head(p.test))
    monkeypatch.setattr(cfood, "CHUNK", 7)
    chunked = fitted(p, "cfood", alpha=1.0).score(p.test, p.head(p.test))
    torch.testing.assert_close(chunked, whole)
    # float32 through and through (theirs computes in float32): the same kappa, rounded to float32
    np.testing.assert_allclose(whole.double().numpy(), cfood_reference(p.train, p.test, 1.0, 0.01), rtol=1e-7)


def test_cfood_grid_and_guards():
    shares, ranks = kappa_grid(40)
    assert ranks[0] == 0 and (np.diff(ranks) > 0).all() and ranks[-1] + 1 <= 39 and len(shares) == len(ranks)
    assert len(kappa_grid(100_000)[0]) == 230
    for bad in ({"alpha": 0.0}, {"k": 1.5}, {"alpha": "x"}):
        with pytest.raises(ConfigError):
            build_scorer("cfood", **bad)
    head = nn.Linear(4, 2)
    stats = FeatureStatistics.from_features(torch.rand(10, 4), torch.arange(10) % 2, 2, head)
    with pytest.raises(FitError, match="at least 2"):
        build_scorer("cfood").fit_statistics(stats, head)  # 10% of 10 features is 1


# ============================================================================================ GrOOD
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


# ============================================================================================ device and dtype
@pytest.mark.parametrize("name", ["gmm", "cfood", "grood"])
def test_fitted_tensors_are_buffers_that_follow_the_scorer(p, name):
    """``double()`` and ``to("meta")`` move every fitted tensor (tests/test_device.py does so for every registered
    scorer through a real test pass, these four included)."""
    kwargs = {"gmm": {"components": 5, "dim": 8}}.get(name, {})
    scorer = fitted(p, name, **kwargs)
    assert len(list(scorer.buffers())) >= 3
    scorer.double()
    assert all(t.dtype == torch.float64 for t in scorer.buffers() if t.is_floating_point())
    scorer.to("meta")
    assert all(t.device.type == "meta" for t in scorer.buffers())


def test_registered_in_the_openood_group():
    from lightning_ood.scoring.registry import GROUPS, SCORERS

    for name in NEW:
        assert name in SCORERS and name in GROUPS["openood"] and name in GROUPS["all"]
        assert "et al." in SCORERS[name].description or "Regmi" in SCORERS[name].description
    assert build_scorer("iodin").needs.inputs and not build_scorer("gmm").needs.inputs
    assert all(build_scorer(name).needs.statistics == {Bank} for name in ("gmm", "cfood", "grood"))
