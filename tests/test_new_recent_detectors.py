"""WeiPer, WeiPer+KLD (Granz et al., NeurIPS 2024), CARef and CADRef (Ling et al., CVPR 2025) against independent
numpy computations written from their authors' code (mgranz/weiper_icml ``weiper_kldiv/utils.py`` and
``weiper_kldiv_postprocessor.py``; LingAndZero/CADRef ``ood_methods/CARef.py``, ``CADRef.py``,
``utils/get_stat.py``), on random features with ties and zeros.

pytorch-ood 0.4 (and its main branch as of October 2024) implements none of the four, and neither does OpenOOD's main
branch; WeiPer at ``delta = 0`` is checked against pytorch-ood's MSP, which it then is.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax
from torch import nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.caref import PredictedMeans
from lightning_ood.scoring.weiper import smooth
from lightning_ood.statistics import Bank, StatisticsAccumulator, StatisticsSetup, build_statistics

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def statistics(train, labels, head, batch=None):
    """The statistics pass over ``train`` in batches of ``batch``, with the extras these scorers read."""
    n, dim = train.shape
    setup = StatisticsSetup(head.out_features, dim, n, bank_images=n)
    acc = StatisticsAccumulator(head.out_features, dim, extras=build_statistics({Bank, PredictedMeans}, setup))
    for index in torch.arange(n).split(batch or n):
        with torch.no_grad():
            acc.update(train[index], labels[index], index, head(train[index]))
    return acc.compute()


@pytest.fixture(scope="module")
def p():
    """Training features exactly representable in float16 (the bank equals them), ties and a dead unit, a float64
    head, and test features near, far (beyond the training range) and equal to training ones, and an all-zero one."""
    g = torch.Generator().manual_seed(0)
    L, C, N = 12, 5, 300
    labels = torch.arange(N) % C
    centres = torch.rand(C, L, generator=g) * 3
    train = (centres[labels] + torch.randn(N, L, generator=g)).relu()
    train[:, 3] = 0.0
    train[50:60] = train[40:50]
    train = train.half().double()
    head = nn.Linear(L, C).double()
    with torch.no_grad():
        head.weight.copy_(centres - 0.8 * centres.mean(0))
        head.weight[1, 5] = 0.0  # a zero weight: in neither of CADRef's parts
        head.bias.copy_(torch.randn(C, generator=g) * 0.1)
    test = torch.cat([(centres[torch.arange(30) % C] + torch.randn(30, L, generator=g)).relu(),
                      torch.rand(20, L, generator=g) * 6, train[:5], torch.zeros(1, L)]).double()  # fmt: skip
    with torch.no_grad():
        logits = head(test)
    return SimpleNamespace(L=L, C=C, train=train, labels=labels, head=head, test=test, logits=logits,
                           stats=statistics(train, labels, head), W=head.weight.detach().numpy(),
                           b=head.bias.detach().numpy(), X=train.numpy(), T=test.numpy())  # fmt: skip


def ours(p, name, **kwargs) -> np.ndarray:
    scorer = build_scorer(name, **kwargs).fit_statistics(p.stats, p.head)
    return scorer.score(p.test, p.logits).double().numpy()


def close(a, b, rtol=1e-9, atol=1e-10):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


# ============================================================================================ WeiPer
def perturbed_head(p, delta, repeats, seed=0):
    """The perturbed head as ``calculate_weiper_space`` builds it: per copy a normal (C, L) draw (our seeded
    protocol: a CPU generator, one float32 draw per copy), its rows normalised, times delta and the rows' norms,
    added to W; the copies stacked, the bias repeated."""
    g = torch.Generator().manual_seed(seed)
    norms = np.linalg.norm(p.W, axis=1, keepdims=True)
    copies = []
    for _ in range(repeats):
        e = torch.randn(p.C, p.L, generator=g).double().numpy()
        copies.append(p.W + delta * norms * e / np.linalg.norm(e, axis=1, keepdims=True))
    return np.concatenate(copies), np.tile(p.b, repeats)


def weiper_msp(z, repeats):  # calculate_weiper_pred: the MSP of each copy's C logits, averaged
    return np.mean([softmax(block, axis=1).max(1) for block in np.split(z, repeats, axis=1)], axis=0)


@pytest.mark.parametrize(("delta", "repeats"), [(1.8, 1), (2.4, 9), (0.5, 20)])
def test_weiper_msp(p, delta, repeats):
    w, b = perturbed_head(p, delta, repeats)
    # weiper scores -log(1 - mean MSP): the same order; back to the authors' mean MSP
    close(1 - np.exp(-ours(p, "weiper", delta=delta, repeats=repeats)), weiper_msp(p.T @ w.T + b, repeats))


def test_weiper_perturbs_each_class_projection_by_delta_times_its_norm(p):
    scorer = build_scorer("weiper", delta=2.0, repeats=4).fit_statistics(p.stats, p.head)
    shift = scorer.perturbed_weight.unflatten(0, (4, p.C)) - p.head.weight.detach()  # (4, C, L)
    close(shift.norm(dim=2).numpy(), 2.0 * np.tile(np.linalg.norm(p.W, axis=1), (4, 1)))
    close(scorer.perturbed_bias.numpy(), np.tile(p.b, 4))


def test_weiper_is_seeded(p):
    first, again = ours(p, "weiper", repeats=5), ours(p, "weiper", repeats=5)
    np.testing.assert_array_equal(first, again)  # the same on every run (and every DDP process)
    assert not np.allclose(first, ours(p, "weiper", repeats=5, seed=1))


def test_weiper_without_perturbation_is_pytorch_ood_msp(p):
    reference = pytorch_ood.MaxSoftmax.score(p.logits)
    close(1 - np.exp(-ours(p, "weiper", delta=0.0, repeats=3)), -reference.double().numpy(), rtol=1e-6)  # float32


# ============================================================================================ WeiPer+KLD
def densities(values, low, high, bins):
    """``calculate_density``: per sample (row), the share of its values in each of ``bins`` bins ``[e_k, e_k+1)``
    from ``low`` to ``high + 1e-8``; values outside fall in the dropped outer bins."""
    edges = low + np.arange(bins + 1) / bins * (high + 1e-8 - low)
    index = np.searchsorted(edges, values, side="right")  # edges[i - 1] <= v < edges[i]
    counts = np.stack([(index == k + 1).sum(axis=1) for k in range(bins)], axis=1)
    return counts / values.shape[1]


def uniform_smoothing(q, size):  # UniformKernel: Conv1d(size, padding="same", padding_mode="replicate")
    before = (size - 1) // 2
    padded = np.pad(q, ((0, 0), (before, size - 1 - before)), mode="edge")
    return np.stack([np.convolve(row, np.ones(size) / size, mode="valid") for row in padded])


def kl_both_ways(p, q, eps):  # kldiv(symmetric=True): p is the training mean, q the sample's smoothed density
    p = (p + eps) / (p + eps).sum()
    q = (q + eps) / (q + eps).sum(axis=1, keepdims=True)
    return (p * np.log(p / q)).sum(1) + (q * np.log(q / p)).sum(1)


def weiper_kld_reference(p, delta, repeats, bins, s1, s2, lambda_1, lambda_2):
    """``calculate_WeiPerKLDiv_score`` after the postprocessor's ``setup`` with ``exact_minmax``: the ranges are the
    training features' and perturbed logits' extremes, the training density the mean of the per-image densities."""
    w, b = perturbed_head(p, delta, repeats)
    train_z, test_z = p.X @ w.T + b, p.T @ w.T + b
    x_range, z_range = (p.X.min(), p.X.max()), (train_z.min(), train_z.max())
    train_density = densities(p.X, *x_range, bins).mean(0)
    train_z_density = densities(train_z, *z_range, bins).mean(0)
    kl = kl_both_ways(train_density, uniform_smoothing(densities(p.T, *x_range, bins), s1), 0.01)
    kl_z = kl_both_ways(train_z_density, uniform_smoothing(densities(test_z, *z_range, bins), s2), 0.025)
    return -(kl + lambda_1 * kl_z - lambda_2 * weiper_msp(test_z, repeats))


@pytest.mark.parametrize(
    ("delta", "repeats", "bins", "s1", "s2", "lambda_1", "lambda_2"),
    [(1.8, 10, 100, 4, 15, 2.5, 0.1), (2.4, 3, 60, 40, 25, 0.1, 1.0), (2.0, 7, 20, 5, 40, 4.0, 5.0)],
)
def test_weiper_kld(p, delta, repeats, bins, s1, s2, lambda_1, lambda_2):
    kwargs = dict(delta=delta, repeats=repeats, bins=bins, smoothing=s1, smoothing_perturbed=s2, lambda_1=lambda_1,
                  lambda_2=lambda_2)  # fmt: skip
    expected = weiper_kld_reference(p, delta, repeats, bins, s1, s2, lambda_1, lambda_2)
    close(ours(p, "weiper_kld", **kwargs), expected)


def test_weiper_kld_blocks_give_the_same_answer(p, monkeypatch):
    import lightning_ood.scoring.weiper as weiper

    whole = ours(p, "weiper_kld", repeats=6, bins=30)
    monkeypatch.setattr(weiper, "CHUNK_VALUES", 7 * 6 * p.C)  # blocks of 7 rows, an uneven last one
    close(ours(p, "weiper_kld", repeats=6, bins=30), whole, rtol=1e-12)


@pytest.mark.parametrize("size", [1, 4, 5, 15, 40])
def test_smoothing_is_the_authors_replicate_padded_conv1d(size):
    """Our moving average against the authors' kernel: a depthwise ``Conv1d(padding="same",
    padding_mode="replicate")`` with weights 1 / size (an even size puts the extra bin after)."""
    q = torch.rand(6, 50, dtype=torch.float64)
    conv = nn.Conv1d(6, 6, size, padding="same", padding_mode="replicate", groups=6, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0 / size)
        expected = conv(q)
    torch.testing.assert_close(smooth(q, size), expected)
    close(smooth(q, size).numpy(), uniform_smoothing(q.numpy(), size))


# ============================================================================================ CARef, CADRef
def predicted_means(p):  # get_stat.py: training features grouped by the predicted class; CARef.get_mean_feature
    predicted = (p.X @ p.W.T + p.b).argmax(1)
    assert len(np.unique(predicted)) == p.C  # every class predicted: the authors' code needs it
    return np.stack([p.X[predicted == c].mean(0) for c in range(p.C)])


def test_caref(p):
    means = predicted_means(p)
    predicted = (p.T @ p.W.T + p.b).argmax(1)
    l1 = np.abs(p.T).sum(1)
    expected = -np.abs(means[predicted] - p.T).sum(1) / np.maximum(l1, 1e-12)
    close(ours(p, "caref"), expected)


def gen_score(z):  # CADRef.py gen(): 1 / sum over the top max(C // 10, 10) probabilities, gamma 0.1
    probs = np.sort(softmax(z, axis=1), axis=1)[:, -max(z.shape[1] // 10, 10) :]
    return 1 / (probs**0.1 * (1 - probs) ** 0.1).sum(1)


LOGIT_SCORES = {
    "energy": lambda z: logsumexp(z, axis=1),
    "msp": lambda z: softmax(z, axis=1).max(1),
    "maxlogit": lambda z: z.max(1),
    "gen": gen_score,
}


@pytest.mark.parametrize("logit_score", list(LOGIT_SCORES))
def test_cadref(p, logit_score):
    means = predicted_means(p)
    score = LOGIT_SCORES[logit_score]
    train_mean_score = score(p.X @ p.W.T + p.b).mean()  # get_global_mean_logit_score: over every training image
    z = p.T @ p.W.T + p.b
    predicted = z.argmax(1)
    dist, sign = p.T - means[predicted], np.sign(p.W[predicted])
    l1 = np.maximum(np.abs(p.T).sum(1), 1e-12)
    positive = np.where(dist * sign < 0, 0, dist * sign).sum(1) / l1
    negative = np.where(-dist * sign < 0, 0, -dist * sign).sum(1) / l1
    expected = -(positive / score(z) + negative / train_mean_score)
    close(ours(p, "cadref", logit_score=logit_score), expected)


def test_cadref_statistics_do_not_depend_on_the_batches(p):
    batched = statistics(p.train, p.labels, p.head, batch=7)
    torch.testing.assert_close(batched.predicted_class_means, p.stats.predicted_class_means)
    torch.testing.assert_close(batched.predicted_class_counts, p.stats.predicted_class_counts)
    for name, value in p.stats.mean_logit_scores.items():
        torch.testing.assert_close(batched.mean_logit_scores[name], value)


def test_a_class_never_predicted_falls_back_to_its_labelled_mean(p):
    head = nn.Linear(p.L, p.C).double()
    with torch.no_grad():
        head.weight.copy_(p.head.weight)
        head.bias.copy_(p.head.bias)
        head.bias[2] = -1e3  # class 2 is never predicted
    stats = statistics(p.train, p.labels, head)
    assert stats.predicted_class_counts[2] == 0
    scorer = build_scorer("caref").fit_statistics(stats, head)
    torch.testing.assert_close(scorer.means[2], p.train[p.labels == 2].mean(0))
    torch.testing.assert_close(scorer.means[0], stats.predicted_class_means[0])


# ============================================================================================ contract
@pytest.mark.parametrize("name", ["weiper", "weiper_kld", "caref", "cadref", "ora"])
def test_fitted_tensors_follow_dtype_and_device(p, name):
    head = nn.Linear(p.L, p.C)  # float32
    with torch.no_grad():
        head.weight.copy_(p.head.weight)
        head.bias.copy_(p.head.bias)
    scorer = build_scorer(name, **({"repeats": 4} if "weiper" in name else {})).fit_statistics(p.stats, head)
    floats = [t for t in scorer.buffers() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    scorer.double()
    assert all(t.dtype == torch.float64 for t in scorer.buffers() if t.is_floating_point())
    with torch.no_grad():
        scores = scorer.score(p.test, head.double()(p.test))
    assert scores.dtype == torch.float64 and torch.isfinite(scores).all()
    scorer.to("meta")
    assert all(t.device.type == "meta" for t in scorer.buffers())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("weiper", {"repeats": 0}), ("weiper", {"delta": -1}), ("weiper_kld", {"bins": 0}),
     ("weiper_kld", {"lambda_1": -1}), ("cadref", {"logit_score": "odin"})],
)  # fmt: skip
def test_bad_hyperparameters_are_refused(name, kwargs):
    with pytest.raises(ConfigError):
        build_scorer(name, **kwargs)


@pytest.mark.parametrize("name", ["weiper", "weiper_kld", "caref", "cadref", "ora"])
def test_fit_on_features_equals_fit_on_the_statistics(p, name):
    """``fit(features, labels, head)`` (the cached-feature path, bench-score's) accumulates what the scorer needs."""
    kwargs = {"repeats": 4} if "weiper" in name else {}
    direct = build_scorer(name, **kwargs).fit(p.train, p.labels, p.head).score(p.test, p.logits)
    close(direct.numpy(), ours(p, name, **kwargs))


# ============================================================================================ ORA
def ora_reference(p, centre):
    """``ora_score`` (util/ood_methods.py lines 156-216): per class, the feature projected onto the boundary with
    the predicted class, both centred and normalised (F.normalize, eps 1e-12), arccos / pi; NaN -> 0; the max."""
    z = p.T @ p.W.T + p.b
    predicted = z.argmax(1)

    def normalise(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    angles = np.zeros((len(p.T), p.C))
    with np.errstate(divide="ignore", invalid="ignore"):
        for c in range(p.C):
            diff = p.W[predicted] - p.W[c]
            moved = p.T - ((z.max(1) - z[:, c]) / np.linalg.norm(diff, axis=1) ** 2)[:, None] * diff
            cos = (normalise(p.T - centre) * normalise(moved - centre)).sum(1)
            angles[:, c] = np.arccos(cos) / np.pi
    return np.nan_to_num(angles, nan=0.0).max(1)


def test_ora(p):
    """The centre is the unweighted mean of the class means: unbalanced classes here (half of class 0 left out)."""
    keep = (p.labels != 0) | (torch.arange(len(p.labels)) % 2 == 0)
    stats = statistics(p.train[keep], p.labels[keep], p.head)
    x, y = p.X[keep.numpy()], p.labels[keep].numpy()
    centre = np.stack([x[y == c].mean(0) for c in range(p.C)]).mean(0)
    scores = build_scorer("ora").fit_statistics(stats, p.head).score(p.test, p.logits).numpy()
    close(scores, ora_reference(p, centre), rtol=1e-7, atol=1e-8)


def test_ora_with_the_authors_id_test_class_means(p):
    """The authors' centre: the mean class mean of ID test features (here: a labelled set with one class absent)."""
    import dataclasses

    from lightning_ood.statistics import FeatureSet

    keep = p.labels != 4
    ref = FeatureSet(p.train[keep][::3], p.head(p.train[keep][::3]).detach(), p.labels[keep][::3])
    stats = dataclasses.replace(p.stats, reference={"id_test": ref})
    scorer = build_scorer("ora", reference="id_test").fit_statistics(stats, p.head)
    x, y = ref.features.numpy(), ref.labels.numpy()
    centre = np.stack([x[y == c].mean(0) for c in range(4)]).mean(0)
    close(scorer.score(p.test, p.logits).numpy(), ora_reference(p, centre), rtol=1e-7, atol=1e-8)


def test_predicted_means_survive_a_checkpoint(p, tmp_path):
    """The statistics as checkpoints store them (flat fields, loaded with ``weights_only=True``) fit CADRef alike."""
    from lightning_ood.statistics import FeatureStatistics

    torch.save(p.stats.cpu_state_dict(), tmp_path / "stats.pt")
    loaded = FeatureStatistics.from_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    scorer = build_scorer("cadref", logit_score="gen").fit_statistics(loaded, p.head)
    close(scorer.score(p.test, p.logits).numpy(), ours(p, "cadref", logit_score="gen"), rtol=0, atol=0)
