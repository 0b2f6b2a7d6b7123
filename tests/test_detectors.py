"""The post-hoc detectors of OpenOOD v1.5 and pytorch-ood: each against an independent computation of its defining
formula (numpy, scipy or plain torch, written here) on random features with ties and zeros, and against pytorch-ood
0.4 where it implements the same method (its scores are outlier scores: ours are their negatives, up to the scale
factors named in each test)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from scipy.stats import entropy
from torch import nn

from lightning_ood.hooks import block_outputs
from lightning_ood.metrics import ood_metrics
from lightning_ood.models import build_backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.activation import rank1_removed_mean
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.ensemble import StageGaussians
from lightning_ood.scoring.gram import GramBounds, gram_features
from lightning_ood.statistics import FeatureStatistics, LogitStatistics, ReferenceSet
from tests.conftest import toy_features
from tests.helpers import scorer_mapping

pytorch_ood = pytest.importorskip("pytorch_ood.detector")

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def p():
    """Training features exactly representable in float16 (so the bank equals them), ties (repeated rows) and
    zeros (dead units), a head that classifies most of them right, and test features near and far."""
    L, C, N = 12, 5, 400
    labels, train, head, near, far = toy_features(L, C, N)
    train = train.half().float()
    test = torch.cat([near, far, train[:5]])
    with torch.no_grad():
        logits, train_logits = head(test), head(train)
    stats = FeatureStatistics.from_features(train, labels, C, head)
    return SimpleNamespace(L=L, C=C, N=N, train=train, labels=labels, head=head, test=test, logits=logits,
                           train_logits=train_logits, stats=stats, W=head.weight.detach().double().numpy(),
                           b=head.bias.detach().double().numpy(), X=train.double().numpy(), T=test.double().numpy(),
                           y=labels.numpy())  # fmt: skip


def ours(p, name, **kwargs) -> np.ndarray:
    scorer = build_scorer(name, **kwargs).fit_statistics(p.stats, p.head)
    return scorer.score(p.test, p.logits).double().numpy()


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def unit(x):
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def energy(z):
    return logsumexp(z, axis=1)


def theirs(detector) -> np.ndarray:
    return detector.double().cpu().numpy() if torch.is_tensor(detector) else np.asarray(detector)


# ============================================================================================ the paper's baselines
def test_logit_baselines_agree_with_pytorch_ood(p):
    """MSP, Energy (T = 1 and 2) and MaxLogit against pytorch-ood's, which return outlier scores (higher = OOD)."""
    # msp scores log p_max (the same order, no ties at p = 1.0): its exponential is pytorch-ood's probability
    close(np.exp(ours(p, "msp")), -theirs(pytorch_ood.MaxSoftmax.score(p.logits)))
    close(ours(p, "energy"), -theirs(pytorch_ood.EnergyBased.score(p.logits)))
    close(ours(p, "energy", temperature=2.0), -theirs(pytorch_ood.EnergyBased.score(p.logits, t=2.0)))
    close(ours(p, "maxlogit"), -theirs(pytorch_ood.MaxLogit.score(p.logits)))


@pytest.mark.parametrize("clip", [0.5, 1.5, 4.0])
def test_react_agrees_with_pytorch_ood(p, clip):
    reference = pytorch_ood.ReAct(None, p.head, threshold=clip).predict_feature_maps(p.test)
    close(ours(p, "react", clip=clip), -theirs(reference))


@pytest.mark.parametrize("percentile", [10, 70, 90])
def test_dice_agrees_with_pytorch_ood(p, percentile):
    """Same mean training activation, one threshold over all C x L contributions, strict '>' (pytorch-ood's p is a
    fraction)."""
    dice = pytorch_ood.DICE(None, p.head.weight, p.head.bias, p=percentile / 100).fit_features(p.train, p.labels)
    close(ours(p, "dice", percentile=percentile), -theirs(dice.predict_features(p.test)), rtol=1e-5, atol=1e-5)


# ============================================================================================ neighbours
@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn(p, k):
    bank, query = unit(p.X), unit(p.T)
    distances = np.sqrt(((query[:, None, :] - bank[None, :, :]) ** 2).sum(-1))  # (M, N), small enough here
    expected = -np.sort(distances, axis=1)[:, k - 1]
    close(ours(p, "knn", k=k), expected, rtol=1e-4, atol=1e-5)
    reference = pytorch_ood.KNN(None, k=k).fit_features(p.train, p.labels).predict_features(p.test)
    close(ours(p, "knn", k=k), -theirs(reference), rtol=1e-4, atol=1e-5)  # pytorch-ood: + distance


def test_knn_chunks_give_the_same_answer(p, monkeypatch):
    import lightning_ood.scoring.neighbours as neighbours

    whole = ours(p, "knn", k=20)
    monkeypatch.setattr(neighbours, "CHUNK", 7)  # many chunks, uneven last one
    close(ours(p, "knn", k=20), whole, rtol=1e-6)


def test_nnguide(p):
    k = 10
    guided = unit(p.X) * energy(p.X @ p.W.T + p.b)[:, None]
    sims = unit(p.T) @ guided.T
    expected = np.sort(sims, axis=1)[:, -k:].mean(axis=1) * energy(p.T @ p.W.T + p.b)
    close(ours(p, "nnguide", k=k, fraction=1.0), expected, rtol=1e-4, atol=1e-5)
    reference = pytorch_ood.NNGuide(None, p.head, k=k).fit_features(p.train, p.labels).predict_features(p.test)
    close(ours(p, "nnguide", k=k, fraction=1.0), -theirs(reference), rtol=1e-4, atol=1e-5)
    # fraction 0.1: one training image in ten, evenly by index
    sub = guided[::10]
    expected = np.sort(unit(p.T) @ sub.T, axis=1)[:, -k:].mean(axis=1) * energy(p.T @ p.W.T + p.b)
    close(ours(p, "nnguide", k=k, fraction=0.1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("power", [1, 2])
def test_relation(p, power):
    def unit_eps(x):
        return x / np.sqrt((x**2).sum(1, keepdims=True) + 1e-10)

    r = np.maximum(unit_eps(p.T) @ unit_eps(p.X).T, 0) * (
        softmax(p.T @ p.W.T + p.b, 1) @ softmax(p.X @ p.W.T + p.b, 1).T
    )
    expected = np.where(r > 0.03, r**power, 0).sum(1)
    close(ours(p, "relation", power=power), expected, rtol=1e-4, atol=1e-5)


# ============================================================================================ subspace
def vim_reference(p, dim):
    u = -np.linalg.pinv(p.W) @ p.b
    centred = p.X - u
    values, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
    ns = vectors[:, np.argsort(values)[::-1][dim:]]
    residual = np.linalg.norm((p.T - u) @ ns, axis=1)
    alpha = (p.X @ p.W.T + p.b).max(1).mean() / np.linalg.norm(centred @ ns, axis=1).mean()
    return energy(p.T @ p.W.T + p.b) - alpha * residual, -residual


@pytest.mark.parametrize("dim", [3, 6])
def test_vim_and_residual(p, dim):
    vim, residual = vim_reference(p, dim)
    close(ours(p, "vim", dim=dim), vim, rtol=1e-4, atol=1e-4)
    close(ours(p, "residual", dim=dim), residual, rtol=1e-4, atol=1e-4)
    reference = pytorch_ood.ViM(None, d=dim, w=p.head.weight.detach(), b=p.head.bias.detach())
    reference.fit_features(p.train, p.labels)
    close(ours(p, "vim", dim=dim), -theirs(reference.predict_features(p.test)), rtol=1e-4, atol=1e-4)


def test_vim_default_dimension_and_bad_dimension(p):
    from lightning_ood.errors import ConfigError
    from lightning_ood.scoring.subspace import default_dim

    assert (default_dim(2048), default_dim(768), default_dim(512), default_dim(342)) == (1000, 512, 256, 171)
    with pytest.raises(ConfigError, match="principal dimension must be in"):
        ours(p, "vim", dim=p.L)


# ============================================================================================ logits
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


# ============================================================================================ distances
def test_rmds(p):
    means = np.stack([p.X[p.y == c].mean(0) for c in range(p.C)])
    centred = p.X - means[p.y]
    precision = np.linalg.pinv(centred.T @ centred / p.N)
    background = np.linalg.pinv(np.cov(p.X.T, bias=True))
    mu0 = p.X.mean(0)
    d = np.stack([(((p.T - m) @ precision) * (p.T - m)).sum(1) for m in means], 1)
    d0 = (((p.T - mu0) @ background) * (p.T - mu0)).sum(1)
    close(ours(p, "rmds"), -(d - d0[:, None]).min(1), rtol=1e-5, atol=1e-5)
    # pytorch-ood inverts the (undivided) scatter plus 1e-6 I, which a dead unit makes huge, where we take the
    # pseudo-inverse: compare without the dead unit
    live = [u for u in range(p.L) if u != 3]
    head = nn.Linear(len(live), p.C).double()
    with torch.no_grad():
        head.weight.copy_(p.head.weight[:, live]), head.bias.copy_(p.head.bias)
    train, test = p.train[:, live].double(), p.test[:, live].double()
    stats = FeatureStatistics.from_features(train, p.labels, p.C, head)
    mine = build_scorer("rmds").fit_statistics(stats, head).score(test, head(test)).numpy()
    reference = pytorch_ood.RMD(None).fit_features(train.float(), p.labels).predict_features(test.float())
    close(mine, -p.N * theirs(reference), rtol=1e-3, atol=1e-2)  # pytorch-ood: the scatter is not divided by N


def test_she_fdbd_nci(p):
    predicted_train = (p.X @ p.W.T + p.b).argmax(1)
    patterns = np.stack([p.X[(p.y == c) & (predicted_train == c)].mean(0) for c in range(p.C)])
    z = p.T @ p.W.T + p.b
    pred = z.argmax(1)
    close(ours(p, "she"), (p.T * patterns[pred]).sum(1), rtol=1e-5)
    she = pytorch_ood.SHE(None, p.head).fit_features(p.train, p.labels)
    close(ours(p, "she"), -theirs(she.predict_features(p.test)), rtol=1e-5)
    mu = p.X.mean(0)
    boundary = np.array([np.mean([abs(z[i, pred[i]] - z[i, c]) / np.linalg.norm(p.W[pred[i]] - p.W[c])
                                  for c in range(p.C) if c != pred[i]]) for i in range(len(z))])  # fmt: skip
    close(ours(p, "fdbd"), boundary / np.linalg.norm(p.T - mu, axis=1), rtol=1e-5)
    close(ours(p, "fdbd", normalizer="norm"), boundary / np.linalg.norm(p.T, axis=1), rtol=1e-5)
    close(ours(p, "fdbd"), -theirs(pytorch_ood.fDBD(None, p.head).fit_features(p.train).predict_features(p.test)),
          rtol=1e-5)  # fmt: skip
    alpha = 0.01
    centred = p.T - mu
    expected = (p.W[pred] * centred).sum(1) / np.linalg.norm(centred, axis=1) + alpha * np.abs(p.T).sum(1)
    close(ours(p, "nci", alpha=alpha), expected, rtol=1e-5)
    reference = pytorch_ood.NCI(None, p.head, alpha=alpha).fit_features(p.train).predict_features(p.test)
    close(ours(p, "nci", alpha=alpha), -theirs(reference), rtol=1e-5)


# ============================================================================================ activation shaping
def ash_reference(x, percentile, variant):
    n = x.shape[1]
    k = max(1, n - int(np.round(n * percentile / 100)))
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        keep = np.argsort(-row, kind="stable")[:k]
        s1 = row.sum()
        if variant == "p":
            out[i, keep] = row[keep]
        elif variant == "b":
            out[i, keep] = s1 / k
        else:
            out[i, keep] = row[keep] * np.exp(s1 / row[keep].sum())
    return out


@pytest.mark.parametrize(("variant", "percentile"), [("p", 60), ("b", 65), ("s", 90), ("s", 0)])
def test_ash_on_pooled_features(p, variant, percentile):
    shaped = ash_reference(p.T, percentile, variant)
    close(ours(p, f"ash_{variant}", percentile=percentile, where="pooled"), energy(shaped @ p.W.T + p.b), 1e-5, 1e-5)
    reference = pytorch_ood.ASH(None, nn.Sequential(nn.Flatten(), p.head), variant=f"ash-{variant}",
                                percentile=percentile / 100)  # fmt: skip
    expected = -theirs(reference.predict_feature_maps(p.test.view(len(p.test), p.L, 1, 1)))
    close(ours(p, f"ash_{variant}", percentile=percentile, where="pooled"), expected, 1e-4, 1e-4)


def test_scale_on_pooled_features(p):
    n, k = p.L, p.L - int(np.round(p.L * 0.85))
    top = np.sort(p.T, axis=1)[:, ::-1][:, :k].sum(1)
    shaped = p.T * np.exp(p.T.sum(1) / top)[:, None]
    close(ours(p, "scale", percentile=85, where="pooled"), energy(shaped @ p.W.T + p.b), 1e-5, 1e-5)
    reference = pytorch_ood.SCALE(None, nn.Sequential(nn.Flatten(), p.head), percentile=0.85)
    close(ours(p, "scale", percentile=85, where="pooled"),
          -theirs(reference.predict_feature_maps(p.test.view(len(p.test), n, 1, 1))), 1e-4, 1e-4)  # fmt: skip


@pytest.fixture(scope="module")
def network():
    """A random ResNet-20 in eval mode with moving BatchNorm statistics, and a batch with its captured maps."""
    torch.manual_seed(0)
    net = build_backbone("resnet20", 4).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        features = net.features(x)
    return SimpleNamespace(net=net, x=x, features=features, logits=net.head(features))


def map_scores(network, name, **kwargs):
    stats = FeatureStatistics.from_features(network.features, torch.arange(6) % 4, 4, network.net.head)
    scorer = build_scorer(name, **kwargs).bind(network.net).fit_statistics(stats, network.net.head)
    with torch.no_grad(), block_outputs(network.net, scorer.needs_blocks) as blocks:
        features = network.net.features(network.x)
    with torch.no_grad():  # after the capture, as the engine scores (RankFeat runs the network's last stages again)
        return scorer(Batch(features, network.net.head(features), blocks, inputs=network.x)).double().numpy()


def final_map(network) -> np.ndarray:
    """The last block's output, read independently of the scorers' capture (a hook on the block)."""
    block = network.net.layers[-1][-1]
    seen = []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        network.net.features(network.x)
    handle.remove()
    return seen[0].double().numpy()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("ash_b_map", {"percentile": 65}),
        ("ash_s_map", {"percentile": 90}),
        ("ash_p_map", {"percentile": 60}),
        ("scale_map", {"percentile": 85}),
    ],
)
def test_ash_and_scale_on_the_final_feature_map(network, name, kwargs):
    """Our variants (``*_map``): the shaping on the final feature map; the authors' placement, on the pooled feature,
    is checked in tests/test_fidelity_activation.py."""
    fmap = final_map(network)  # (N, C, H, W)
    flat = fmap.reshape(len(fmap), -1)
    if name == "scale_map":
        k = flat.shape[1] - int(np.round(flat.shape[1] * 0.85))
        shaped = flat * np.exp(flat.sum(1) / np.sort(flat, 1)[:, ::-1][:, :k].sum(1))[:, None]
    else:
        shaped = ash_reference(flat, kwargs["percentile"], name.split("_")[1])
    pooled = shaped.reshape(fmap.shape).mean(axis=(2, 3))
    w, b = network.net.head.weight.detach().double().numpy(), network.net.head.bias.detach().double().numpy()
    close(map_scores(network, name, **kwargs), energy(pooled @ w.T + b), rtol=1e-4, atol=1e-4)


def test_rankfeat_block4(network):
    """The authors' Block-4-only variant: on ResNet-20 the last stage's output is the final feature map (the fused
    default is checked in tests/test_fidelity_activation.py)."""
    fmap = final_map(network)
    matrices = fmap.reshape(len(fmap), fmap.shape[1], -1)
    removed = []
    for m in matrices:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        removed.append((m - s[0] * np.outer(u[:, 0], vt[0])).mean(axis=1))
    w, b = network.net.head.weight.detach().double().numpy(), network.net.head.bias.detach().double().numpy()
    close(map_scores(network, "rankfeat_block4"), energy(np.stack(removed) @ w.T + b), rtol=1e-4, atol=1e-4)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), network.net.head)
    reference = pytorch_ood.RankFeat(None, head).predict_feature_maps(torch.tensor(fmap).float())
    close(map_scores(network, "rankfeat_block4"), -theirs(reference), rtol=1e-3, atol=1e-3)


def reference_rank1_removed_mean(matrix: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (matrix - s[0] * np.outer(u[:, 0], vt[0])).mean(axis=1)


@pytest.mark.parametrize(("channels", "positions"), [(8, 20), (20, 8), (6, 6)])
def test_rank1_removal_by_power_iteration_matches_the_svd(channels, positions):
    """Both Gram sides (C <= S as ResNet-20's 64 x 64 map, C > S as ResNet-18's 512 x 16), signed entries too."""
    rng = np.random.default_rng(channels)
    matrices = rng.gamma(1.0, 1.0, (5, channels, positions)) - rng.uniform(0, 1.0, (5, 1, 1))
    actual = rank1_removed_mean(torch.tensor(matrices))
    expected = np.stack([reference_rank1_removed_mean(m) for m in matrices])
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_rank1_removal_with_a_nearly_degenerate_top_pair_takes_the_svd():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    v, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    matrix = u[:, :3] @ np.diag([1.0, 1.0 - 1e-6, 0.3]) @ v[:, :3].T  # power iteration would need ~1e7 steps
    actual = rank1_removed_mean(torch.tensor(matrix[None]))
    np.testing.assert_allclose(actual[0].numpy(), reference_rank1_removed_mean(matrix), rtol=1e-6, atol=1e-9)


# ============================================================================================ OpenMax, Gram, Lee
def test_openmax_matches_pytorch_ood(p):
    right = (p.train_logits.argmax(1) == p.labels).numpy()
    stats = FeatureStatistics.from_features(p.train[right], p.labels[right], p.C, p.head)  # every image correct
    scorer = build_scorer("openmax", tail=20, alpha=3).fit_statistics(stats, p.head)
    reference = pytorch_ood.OpenMax(None, tailsize=20, alpha=3, euclid_weight=1.0)
    reference.fit_logits(p.train_logits[right], p.labels[right])
    # the Weibull fits are numerical maximum-likelihood optimisations (ours on float64 logits): agreement to ~1e-3
    # ours scores -log p(unknown), the same order as the authors' -p(unknown)
    unknown = np.exp(-scorer.score(p.test, p.logits).double().numpy())
    close(-unknown, -theirs(reference.predict_logits(p.logits)), 5e-3, 1e-4)


def test_gram_statistics_and_score(network):
    """Bounds, held-out normaliser and score against numpy on the Gram features of every block."""
    from lightning_ood.data.base import IndexedDataset
    from lightning_ood.fitting import FitInputs, compute_feature_statistics
    from lightning_ood.scoring.gram import GRAM_HOLDOUT

    torch.manual_seed(1)
    images = torch.randn(120, 3, 32, 32)
    labels = torch.arange(120) % 4
    inputs = FitInputs(network.net, "test", frozenset({GramBounds, LogitStatistics}))
    loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(images, labels)), batch_size=32)
    stats = compute_feature_statistics(inputs, loader, progress=False, log=False)
    blocks = list(network.net.blocks())
    captured = {}
    probe = torch.cat([images[:3], images[3:6] * 3])  # three training images, three far from them
    with torch.no_grad(), block_outputs(network.net, blocks) as out:
        predicted = network.net(images).argmax(1).numpy()
        captured = {name: out[name].double().numpy() for name in blocks}
        probe_predicted = network.net(probe).argmax(1).numpy()
        probed = {name: out[name].clone() for name in blocks}
    held = np.arange(120) % GRAM_HOLDOUT == 0

    def gram(m):  # (N, C, H, W) -> (N, P, C): row sums of (x^p)(x^p)^T, signed p-th root
        x = m.reshape(len(m), m.shape[1], -1)
        out = []
        for power in range(1, 11):
            a = x**power
            g = np.einsum("ncs,nds->ncd", a, a).sum(axis=2)
            out.append(np.sign(g) * np.abs(g) ** (1 / power))
        return np.stack(out, 1)

    total = 0
    for name in blocks:
        g = gram(captured[name])
        # float32 after scaling each image's map to a largest |value| of 1: within float32 rounding of the largest
        # Gram feature (channels far below the largest activation lose digits at the highest orders, as in the
        # authors' float32)
        atol = 1e-6 * float(np.abs(captured[name]).max()) ** 2
        ours = gram_features(torch.tensor(captured[name])).double()
        torch.testing.assert_close(ours, torch.tensor(g), rtol=2e-6, atol=atol)
        for c in range(4):
            members = g[~held & (predicted == c)]
            if len(members):
                close(stats.gram[name]["mins"][c], members.min(0), rtol=2e-6, atol=atol)
                close(stats.gram[name]["maxs"][c], members.max(0), rtol=2e-6, atol=atol)
        lo, hi = stats.gram[name]["mins"].numpy(), stats.gram[name]["maxs"].numpy()

        def deviation(features, classes, lo=lo, hi=hi):
            low, high = lo[classes], hi[classes]
            below = np.maximum(low - features, 0) / np.abs(low + 1e-6)
            above = np.maximum(features - high, 0) / np.abs(high + 1e-6)
            return (below + above).reshape(len(features), -1).sum(1)

        mine = ours.numpy()  # the deviations from the features checked above (float64 ones sit ~1e-7 off the bounds)
        normaliser = deviation(mine[held], predicted[held]).mean()
        close(stats.gram[name]["normalizer"], normaliser, rtol=1e-9)
        total = total + deviation(gram_features(probed[name]).double().numpy(), probe_predicted) / normaliser
    scorer = build_scorer("gram").bind(network.net).fit_statistics(stats, network.net.head)
    with torch.no_grad(), block_outputs(network.net, scorer.needs_blocks) as out:
        features = network.net.features(probe)
        scores = scorer(Batch(features, network.net.head(features), out))
    assert (total[3:] > 1).all()  # the scaled images leave the bounds
    close(scores.double().numpy(), -total, rtol=1e-5)


def test_the_bank_keeps_features_beyond_float16_range_in_float32(p):
    """float16 holds the bank of an ordinary network (half the bytes); features above 65,504 (an untrained DenseNet
    reaches 4e5) would become inf there, and KNN / OpenMax NaN: that bank stays float32 and its scores finite."""
    assert p.stats.bank.dtype == torch.float16
    big = p.train * 1e5
    stats = FeatureStatistics.from_features(big, p.labels, p.C, p.head)
    assert stats.bank.dtype == torch.float32 and torch.equal(stats.bank, big)
    for name in ("knn", "openmax"):
        scorer = build_scorer(name).fit_statistics(stats, p.head)
        test = p.test * 1e5
        assert torch.isfinite(scorer.score(test, p.head(test))).all(), name


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0, 1e4])
def test_gram_features_stay_finite_and_exact_for_large_and_small_activations(magnitude):
    """x^20 overflows float32 above ~80 and x^10 underflows below ~1e-4: per-image scaling keeps every order finite
    and within float32 rounding of float64, also with signed maps and (N, T, D) token outputs."""
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((5, 6, 4, 4)) * magnitude
    maps[0] = 0.0  # an all-zero map: every feature 0

    def reference(x):  # float64 numpy: row sums of (x^p)(x^p)^T, signed p-th root
        x = x.reshape(len(x), x.shape[1], -1)
        rows = [np.einsum("ncs,nds->nc", x**p, x**p) for p in range(1, 11)]
        return np.stack([np.sign(r) * np.abs(r) ** (1 / p) for p, r in enumerate(rows, start=1)], 1)

    ours = gram_features(torch.tensor(maps, dtype=torch.float32)).double().numpy()
    assert np.isfinite(ours).all()
    close(ours, reference(maps.astype(np.float32).astype(np.float64)), rtol=1e-5, atol=1e-6 * magnitude**2)
    tokens = rng.standard_normal((3, 7, 5)) * magnitude  # (N, T, D): channels are the last dimension
    close(gram_features(torch.tensor(tokens, dtype=torch.float32)).double().numpy(),
          reference(tokens.astype(np.float32).astype(np.float64).transpose(0, 2, 1)),
          rtol=1e-5, atol=1e-6 * magnitude**2)  # fmt: skip


def test_mahalanobis_ensemble_against_autograd(network):
    from lightning_ood.data.base import IndexedDataset
    from lightning_ood.fitting import FitInputs, compute_feature_statistics

    torch.manual_seed(2)
    images, labels = torch.randn(64, 3, 32, 32), torch.arange(64) % 4
    inputs = FitInputs(network.net, "test", frozenset({StageGaussians}))
    loader = torch.utils.data.DataLoader(IndexedDataset(torch.utils.data.TensorDataset(images, labels)), batch_size=16)
    stats = compute_feature_statistics(inputs, loader, progress=False, log=False)
    stages = network.net.stages()

    def stage_means(x):
        with block_outputs(network.net, stages) as out:
            network.net.features(x)
        return {name: out[name].mean(dim=(2, 3)).double() for name in stages}

    with torch.no_grad():
        train = stage_means(images)
    params = {}
    for name in stages:  # class means and the shared covariance, from scratch
        f = train[name]
        means = torch.stack([f[labels == c].mean(0) for c in range(4)])
        centred = f - means[labels]
        params[name] = (means, torch.linalg.pinv(centred.T @ centred / len(f), hermitian=True))
        torch.testing.assert_close(stats.stages[name]["class_means"], means, rtol=1e-9, atol=1e-9)

    def closest(f, name):
        means, precision = params[name]
        d = torch.stack([((f - m) @ precision * (f - m)).sum(1) for m in means], 1)
        return d.min(1).values

    x, eps, std = network.x, 0.01, (0.5, 0.25, 0.2)
    expected = torch.zeros(len(x), dtype=torch.float64)
    for name in stages:
        moving = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(closest(stage_means(moving)[name], name).sum(), moving)
        moved = x - eps * torch.where(grad >= 0, 1.0, -1.0) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            expected -= closest(stage_means(moved)[name], name)
    scorer = build_scorer("mds_ensemble", epsilon=eps).bind(network.net).fit_statistics(stats, network.net.head)
    with torch.no_grad():
        h = network.net.features(x)
    scores = scorer(Batch(h, network.net.head(h), inputs=x, features_of=network.net.features, std=std))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


# ============================================================================================ metrics and protocol
def test_openood_fpr_has_ood_as_the_positive_class():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    id_scores, ood_scores = torch.tensor(rng.normal(1, 1, 500)), torch.tensor(rng.normal(0, 1, 300))
    ours_ood = ood_metrics(id_scores, ood_scores, positive="ood")["fpr95"]
    labels = np.r_[np.zeros(500), np.ones(300)]  # OOD positive, scores negated (higher = more OOD)
    fpr, tpr, _ = roc_curve(labels, -np.r_[id_scores.numpy(), ood_scores.numpy()], drop_intermediate=False)
    assert ours_ood == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")])
    assert ours_ood != pytest.approx(ood_metrics(id_scores, ood_scores)["fpr95"])  # a different number


def test_statistics_on_demand_groups_and_openood_fpr_through_the_cli(tmp_path):
    """Through the CLI: the statistics a checkpoint lacks (the bank) are fitted on demand, near/far averages and
    OpenOOD's FPR are reported. (Every registered method in one pass through the CLI: tests/test_ddp.py.)"""
    from tests.test_cli import run_cli

    data = ["--data", "SyntheticDataModule", "--data.num_classes", "4", "--data.train_size", "80", "--data.test_size",
            "30", "--data.ood_sizes", "{}", "--data.ood",
            '[{"name": "gaussian_noise", "size": 20, "group": "far"}, {"name": "uniform_noise", "size": 15, '
            '"group": "near"}]', "--model.backbone", "resnet20", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--checkpoint.dirpath", str(tmp_path / "c")]  # fmt: skip
    run_cli("fit", *data, "--trainer.max_epochs", "1", "--model.scorers", "[msp]")
    fitted = torch.load(tmp_path / "c" / "last.ckpt", weights_only=True)["ood_statistics"]
    assert "bank" not in fitted and "gram" not in fitted  # msp needs neither: the checkpoint stays small
    from lightning_ood.scoring.registry import GROUPS

    scorers = json.dumps(scorer_mapping(["msp", "knn", "gram", "mahalanobis"]))  # the bank and Gram bounds on demand
    run_cli("test", *data, "--ckpt_path", str(tmp_path / "c" / "last.ckpt"), "--model.scorers", scorers,
            "--model.fpr_positive", "ood", "--trainer.logger.init_args.version", "all")  # fmt: skip
    report = json.loads((tmp_path / "logs" / "lightning_ood" / "all" / "ood_results.json").read_text())
    assert list(report["metrics"]) == ["msp", "knn", "gram", "mahalanobis"] and len(GROUPS["all"]) >= 40
    values = [v for per in report["metrics"].values() for m in per.values() for v in m.values()]
    assert all(math.isfinite(v) for v in values)
    assert report["groups"] == {"gaussian_noise": "far", "uniform_noise": "near"} and report["fpr_positive"] == "ood"
    assert set(report["group_average"]) == {"far", "near"} and "fpr95_ood" in report["average"]["knn"]
    assert "Average (far)" in (tmp_path / "logs" / "lightning_ood" / "all" / "ood_results.md").read_text()
