"""Every scorer against an independent reference written here with numpy (explicit loops, np.percentile,
np.linalg.pinv, sklearn) or, for ODIN, with torch autograd by hand; plus the training-set statistics they are fitted on.

Conventions (docs/METHOD.md, notes/method_facts.md): h (N, L) post-ReLU pooled features, head W (C, L) and b (C,);
higher score = more in-distribution. The references never call the project's helpers (``percentile``,
``class_weight_mask``, ``prototype_cosine``, ...).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import pinvh
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from lightning_ood.errors import ConfigError, FitError
from lightning_ood.scoring import SCORERS, build_scorer, class_weight_mask
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.fmls import CPU_BLOCK
from lightning_ood.statistics import FeatureStatistics, StatisticsAccumulator, percentile
from tests.helpers import QUICK_SETTINGS

pytestmark = pytest.mark.numerics  # run again at another thread count by make test

RTOL, ATOL = 1e-5, 1e-6  # float32 paths against float64 references


# ============================================================================================ numpy references
def ref_logsumexp(logits: np.ndarray) -> np.ndarray:  # (N, C) -> (N,)
    out = np.empty(len(logits))
    for i, row in enumerate(logits):
        m = max(row)
        out[i] = m + math.log(sum(math.exp(v - m) for v in row))
    return out


def ref_msp(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The log of the maximum softmax probability (what msp scores: the same order as the probability),
    ``-log1p(sum of the other classes' exp(z - max))``."""
    out = np.empty(len(logits))
    for i, row in enumerate(logits):
        z = [v / temperature for v in row]
        top = z.index(max(z))
        out[i] = -math.log1p(sum(math.exp(v - z[top]) for j, v in enumerate(z) if j != top))
    return out


def ref_output(logits: np.ndarray, output: str) -> np.ndarray:
    return ref_logsumexp(logits) if output == "energy" else ref_msp(logits)


def ref_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return 0.0
    return float(sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb))


def ref_class_means(train: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    means = np.zeros((num_classes, train.shape[1]))
    for c in range(num_classes):
        rows = [train[i] for i in range(len(train)) if labels[i] == c]
        means[c] = np.sum(rows, axis=0) / len(rows)
    return means


def ref_fmls_logits(
    h, W, b, prototypes, p, clip, mask=True, smooth=True, tie_rule=">=", class_from="original", cos_of="raw",
    scale_bias=True,
):  # fmt: skip
    """The paper's logits per sample; the keyword options give the WRONG variants the tests must rule out."""
    out = np.zeros((len(h), len(W)))
    for i, x in enumerate(h):
        x_clip = np.minimum(x, clip) if clip is not None else x
        c = int(np.argmax(W @ (x if class_from == "original" else x_clip) + b))
        hm = x.copy()
        if mask:
            t = np.percentile(W[c], p)
            keep = W[c] >= t if tie_rule == ">=" else W[c] > t
            hm = np.where(keep, hm, 0.0)
        if clip is not None:
            hm = np.minimum(hm, clip)
        f = W @ hm
        if smooth:
            s = ref_cosine({"raw": x, "modified": hm}[cos_of], prototypes[c])
            f = s * (f + b) if scale_bias else s * f + b
        else:
            f = f + b
        out[i] = f
    return out


def ref_react_logits(h, W, b, threshold):
    return np.stack([W @ np.minimum(x, threshold) + b for x in h])


def ref_dice_logits(h, W, b, mean_h, p, clip=None, tie_rule=">"):
    C, L = W.shape
    contrib = np.zeros((C, L))
    for c in range(C):
        for u in range(L):
            contrib[c, u] = W[c, u] * mean_h[u]
    t = np.percentile(contrib, p)  # ONE threshold over all C*L entries
    keep = contrib > t if tie_rule == ">" else contrib >= t
    Wm = np.where(keep, W, 0.0)
    return np.stack([Wm @ (np.minimum(x, clip) if clip is not None else x) + b for x in h])


def ref_line_logits(h, W, b, train, labels, p_w, p_a, clip, smooth=False, class_from="clipped"):
    C, L = W.shape
    contrib = np.zeros((C, L))
    for c in range(C):
        rows = [train[i] * W[c] for i in range(len(train)) if labels[i] == c]  # Taylor: h_i * dlogit_c/dh = h_i * W[c]
        contrib[c] = np.mean(rows, axis=0)
    act = np.stack([contrib[c] > np.percentile(contrib[c], p_a) for c in range(C)])  # strict, per class row
    prototypes = ref_class_means(train, labels, C)
    out = np.zeros((len(h), C))
    for i, x in enumerate(h):
        x_clip = np.minimum(x, clip) if clip is not None else x
        c = int(np.argmax(W @ (x_clip if class_from == "clipped" else x) + b))
        importance = np.abs(contrib[c])[None, :] * W  # (C, L): |.| on the contribution only
        Wm = np.where(importance > np.percentile(importance, p_w), W, 0.0)  # one threshold over all C*L, strict
        f = Wm @ (x_clip * act[c]) + b
        if smooth:
            c0 = int(np.argmax(W @ x + b))
            f = ref_cosine(x, prototypes[c0]) * f
        out[i] = f
    return out


def ref_mahalanobis(h, train, labels, num_classes):
    means = ref_class_means(train, labels, num_classes)
    centred = np.concatenate([train[labels == c] - means[c] for c in range(num_classes)])
    cov = EmpiricalCovariance(assume_centered=False).fit(centred).covariance_
    P = np.linalg.pinv(cov)
    return np.array([max(-(x - m) @ P @ (x - m) for m in means) for x in h])


# ============================================================================================ test problems
def linear_head(W: np.ndarray, b: np.ndarray) -> nn.Linear:
    head = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head


def make_problem(train, labels, test, W, b) -> SimpleNamespace:
    """Float32 tensors for the scorers, float64 numpy copies of the SAME values for the references."""
    t = SimpleNamespace(
        train=torch.as_tensor(np.asarray(train), dtype=torch.float32),
        labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
        test=torch.as_tensor(np.asarray(test), dtype=torch.float32),
        head=linear_head(np.asarray(W), np.asarray(b)),
    )
    t.logits = t.head(t.test).detach()
    t.num_classes = t.head.out_features
    t.train64 = t.train.double().numpy()
    t.test64 = t.test.double().numpy()
    t.labels64 = t.labels.numpy()
    t.W = t.head.weight.detach().double().numpy()
    t.b = t.head.bias.detach().double().numpy()
    t.prototypes = ref_class_means(t.train64, t.labels64, t.num_classes)
    return t


def random_problem(seed: int = 0, num_classes: int = 4, dim: int = 10, n_train: int = 48, n_test: int = 24):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(num_classes), rng.integers(0, num_classes, n_train - num_classes)]
    centers = rng.gamma(2.0, 0.5, (num_classes, dim))
    train = np.maximum(centers[labels] + rng.normal(0, 0.4, (n_train, dim)), 0)
    test = np.maximum(centers[rng.integers(0, num_classes, n_test)] + rng.normal(0, 0.8, (n_test, dim)), 0)
    test[: n_test // 4] *= 3  # abnormally large activations
    test[-1] = 0  # a dead feature vector (possible after the ReLU): cosine 0
    W = rng.normal(0, 1, (num_classes, dim))
    b = rng.normal(0, 0.5, num_classes)
    return make_problem(train, labels, test, W, b)


@pytest.fixture(scope="module")
def prob():
    return random_problem(0)


def score_with(name: str, p, **kwargs) -> np.ndarray:
    scorer = build_scorer(name, **kwargs).fit(p.train, p.labels, p.head)
    scores = scorer.score(p.test, p.logits)
    assert scores.shape == (len(p.test),)
    return scores.double().numpy()


def assert_scores(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def differs(a: np.ndarray, b: np.ndarray, by: float = 1e-3) -> bool:
    return bool(np.max(np.abs(a - b)) > by)


# ============================================================================================ output scores
def test_msp_energy_maxlogit(prob):
    logits64 = prob.logits.double().numpy()
    assert_scores(score_with("msp", prob), ref_msp(logits64))
    assert_scores(score_with("energy", prob), ref_logsumexp(logits64))
    assert_scores(score_with("energy", prob, temperature=2.0), 2.0 * ref_logsumexp(logits64 / 2.0))
    assert_scores(score_with("maxlogit", prob), np.array([max(row) for row in logits64]))


# ============================================================================================ FMLS (the paper)
FMLS_CASES = [
    ("fmls", {}, {"p": 60, "clip": 1.0}),
    ("fmls", {"percentile": 30, "clip": 0.8}, {"p": 30, "clip": 0.8}),
    ("fmls", {"percentile": 0}, {"p": 0, "clip": 1.0}),
    ("fmls", {"percentile": 100}, {"p": 100, "clip": 1.0}),
    ("fmls", {"percentile": 45.5, "clip": 1e9}, {"p": 45.5, "clip": 1e9}),
    ("fmls", {"clip": None, "clip_percentile": 90}, {"p": 60, "clip": "p90"}),
    ("react_ls", {"clip": None, "clip_percentile": 80}, {"p": 60, "clip": "p80", "mask": False}),
    ("energy_fmls", {}, {"p": 60, "clip": 1.0}),
    ("react_fm", {}, {"p": 60, "clip": 1.0, "smooth": False}),
    ("react_ls", {}, {"p": 60, "clip": 1.0, "mask": False}),
    ("fm_ls", {}, {"p": 60, "clip": None}),
    ("msp_fmls", {}, {"p": 60, "clip": 1.0, "output": "msp"}),
    ("msp_fmls", {"percentile": 20, "clip": 1.3}, {"p": 20, "clip": 1.3, "output": "msp"}),
]


@pytest.mark.parametrize(("name", "kwargs", "ref"), FMLS_CASES, ids=[f"{n}-{k}" for n, k, _ in FMLS_CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_fmls_family_matches_reference(name, kwargs, ref, seed):
    p = random_problem(seed)
    ref = dict(ref)
    output = ref.pop("output", "energy")
    if isinstance(ref["clip"], str):  # "p80": that percentile of all training activations
        ref["clip"] = np.percentile(p.train64.ravel(), float(ref["clip"][1:]))
    expected = ref_output(ref_fmls_logits(p.test64, p.W, p.b, p.prototypes, **ref), output)
    assert_scores(score_with(name, p, **kwargs), expected)


def test_fmls_scores_many_vectors_in_cpu_blocks_as_the_paper():
    """More vectors than one CPU block (see FMLS.logits): every row, on both sides of each block boundary, scored as
    the reference scores it."""
    p = random_problem(1, n_test=2 * CPU_BLOCK + 37)
    expected = ref_logsumexp(ref_fmls_logits(p.test64, p.W, p.b, p.prototypes, p=60, clip=1.0))
    assert_scores(score_with("fmls", p), expected)


def test_fmls_with_a_negative_clip_masks_before_clipping():
    """Signed features (ViT): a low clip percentile gives lambda < 0, where masking and clipping do not commute."""
    p0 = random_problem(2)
    shift = p0.train64.mean()
    p = make_problem(p0.train64 - shift, p0.labels64, p0.test64 - shift, p0.W, p0.b)
    clip = np.percentile(p.train64.ravel(), 5)
    assert clip < 0
    expected = ref_logsumexp(ref_fmls_logits(p.test64, p.W, p.b, p.prototypes, p=60, clip=clip))
    assert_scores(score_with("fmls", p, clip=None, clip_percentile=5), expected)


def test_fmls_aliases_and_ablations_are_distinct(prob):
    fmls = score_with("fmls", prob)
    np.testing.assert_array_equal(score_with("energy_fmls", prob), fmls)
    ablations = {name: score_with(name, prob) for name in ["fmls", "react_fm", "react_ls", "fm_ls", "react", "energy"]}
    names = list(ablations)
    for i, a in enumerate(names):  # the random problem exercises masking, clipping and smoothing
        for b in names[i + 1 :]:
            assert differs(ablations[a], ablations[b]), (a, b)


def test_fmls_hand_computed_example():
    # L = 4, C = 2, p = 50, lambda = 1.5.
    # W = [[1, 2, 3, 4], [4, 3, 2, 1]], b = [0.5, -0.5]; prototypes v0 = mean([1,0,1,1], [3,0,1,3]) = [2, 0, 1, 2].
    # h = [1, 0, 2, 2]: original logits [1+6+8+0.5, 4+4+2-0.5] = [15.5, 9.5] -> c = 0.
    # Row 0 percentile 50 of [1, 2, 3, 4] = 2.5 -> keep units 2, 3 -> h_m = [0, 0, 2, 2] -> clip -> [0, 0, 1.5, 1.5].
    # f_m = [3*1.5 + 4*1.5 + 0.5, 2*1.5 + 1*1.5 - 0.5] = [11, 4].
    # s = cos(h, v0) = (2 + 0 + 2 + 4) / (3 * 3) = 8/9 -> f_hat = [88/9, 32/9].
    # score = log(exp(88/9) + exp(32/9)) = 88/9 + log1p(exp(-56/9)) = 9.779760640186536.
    train = [[1, 0, 1, 1], [3, 0, 1, 3], [0, 2, 0, 0], [0, 0, 2, 0]]
    p = make_problem(train, [0, 0, 1, 1], [[1, 0, 2, 2]], [[1, 2, 3, 4], [4, 3, 2, 1]], [0.5, -0.5])
    score = score_with("fmls", p, percentile=50, clip=1.5)
    assert score[0] == pytest.approx(9.779760640186536, rel=1e-6)
    logits = build_scorer("fmls", percentile=50, clip=1.5).fit(p.train, p.labels, p.head).logits(p.test, p.logits)
    torch.testing.assert_close(logits, torch.tensor([[88 / 9, 32 / 9]]), rtol=1e-6, atol=1e-6)


def tie_problem() -> SimpleNamespace:
    # Row 0 sorted: [-1, 0, 0.5, 1, 1, 1, 2, 3]. p = 50 -> virtual index 3.5 between two 1s -> threshold exactly 1.
    # Row 1 has its maximum 3 twice (p = 100 keeps both).
    W = [[0.5, 1, 1, 1, 2, 3, -1, 0], [3, 3, 0, 1, 2, -2, 0.5, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    b = [6.0, 0.0, -40.0]  # class 0 wins on the test features below; then class 1
    rng = np.random.default_rng(5)
    train = rng.uniform(0.1, 2.0, (12, 8)).round(2)
    labels = np.arange(12) % 3
    test = np.r_[np.full((1, 8), 1.25), rng.uniform(0.2, 1.5, (5, 8)).round(2), np.full((1, 8), 0.5)]
    test[-1, 0] = 8  # original class 1 (W[1, 0] = 3)
    return make_problem(train, labels, test, W, b)


def test_class_weight_mask_tie_rule():
    p = tie_problem()
    W = p.head.weight.detach()
    expected = {
        50: [[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1, 1]],
        0: [[1] * 8] * 3,
        100: [[0, 0, 0, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]],
    }
    for q, mask in expected.items():
        ref = np.stack([p.W[c] >= np.percentile(p.W[c], q) for c in range(3)])
        np.testing.assert_array_equal(ref, np.array(mask, dtype=bool))  # the hand-written masks are numpy's
        assert torch.equal(class_weight_mask(W, q), torch.tensor(mask, dtype=torch.bool)), q


@pytest.mark.parametrize("q", [50, 60, 0, 100])
def test_fmls_keeps_ties_at_the_threshold(q):
    p = tie_problem()
    classes = p.logits.argmax(1)
    assert classes[0] == 0 and classes[-1] == 1 and set(classes.tolist()) >= {0, 1}
    for kwargs in [{"clip": None, "smooth": False}, {"clip": 1.0}]:
        ref = {"p": q, "clip": kwargs["clip"], "smooth": kwargs.get("smooth", True)}
        actual = score_with("fmls", p, percentile=q, **kwargs)
        assert_scores(actual, ref_logsumexp(ref_fmls_logits(p.test64, p.W, p.b, p.prototypes, **ref)))
        strict = ref_logsumexp(ref_fmls_logits(p.test64, p.W, p.b, p.prototypes, tie_rule=">", **ref))
        assert differs(actual, strict)  # a strict '>' would drop the tied (or the only remaining) units
    if q == 0:  # keeps every unit: same as no masking
        np.testing.assert_allclose(score_with("fmls", p, percentile=0), score_with("react_ls", p), rtol=1e-6)


def test_fmls_class_is_argmax_of_original_logits():
    # W = [[4, .5, 0, 0], [0, .5, 2.5, 2]], h = [3, 1, 1, 1], lambda = 1, p = 50:
    # original logits [12.5, 5] -> c = 0 (mask keeps units 0, 1); the clipped feature [1, 1, 1, 1] gives [4.5, 5] -> 1.
    train = [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    p = make_problem(train, [0, 0, 1, 1], [[3, 1, 1, 1]], [[4, 0.5, 0, 0], [0, 0.5, 2.5, 2]], [0, 0])
    assert int(np.argmax(p.W @ np.minimum(p.test64[0], 1) + p.b)) == 1
    actual = score_with("fmls", p, percentile=50, clip=1.0)
    # c = 0: h_m = [1, 1, 0, 0], f_m = [4.5, 0.5], s = cos([3,1,1,1], [1,1,0,0]) = 4 / sqrt(24).
    s = 4 / math.sqrt(24)
    assert actual[0] == pytest.approx(math.log(math.exp(4.5 * s) + math.exp(0.5 * s)), rel=1e-6)
    ref = {"p": 50, "clip": 1.0}
    assert_scores(actual, ref_logsumexp(ref_fmls_logits(p.test64, p.W, p.b, p.prototypes, **ref)))
    wrong = ref_logsumexp(ref_fmls_logits(p.test64, p.W, p.b, p.prototypes, class_from="clipped", **ref))
    assert differs(actual, wrong, 0.1)


def test_fmls_cosine_uses_the_raw_feature_and_scales_the_bias(prob):
    ref = {"p": 60, "clip": 1.0}
    actual = score_with("fmls", prob)
    assert_scores(actual, ref_logsumexp(ref_fmls_logits(prob.test64, prob.W, prob.b, prob.prototypes, **ref)))
    modified = ref_logsumexp(ref_fmls_logits(prob.test64, prob.W, prob.b, prob.prototypes, cos_of="modified", **ref))
    unscaled = ref_logsumexp(ref_fmls_logits(prob.test64, prob.W, prob.b, prob.prototypes, scale_bias=False, **ref))
    assert differs(actual, modified)  # cosine of the masked + clipped feature: a different method
    assert differs(actual, unscaled)  # bias added after the smoothing: a different method
    # Masking only (no clipping) or clipping only: the raw feature still gives the cosine.
    for kwargs, r in [({"clip": None}, {"p": 60, "clip": None}), ({"mask": False}, {"p": 60, "clip": 1.0})]:
        r["mask"] = kwargs.get("mask", True)
        actual = score_with("fmls", prob, **kwargs)
        assert_scores(actual, ref_logsumexp(ref_fmls_logits(prob.test64, prob.W, prob.b, prob.prototypes, **r)))
        wrong = ref_logsumexp(ref_fmls_logits(prob.test64, prob.W, prob.b, prob.prototypes, cos_of="modified", **r))
        assert differs(actual, wrong)


def test_fmls_zero_feature_scores_log_num_classes(prob):
    # cos(0, v_c) = 0: every smoothed logit (bias included) is 0 -> energy log C.
    assert score_with("fmls", prob)[-1] == pytest.approx(math.log(prob.num_classes), rel=1e-6)


def test_fmls_ranks_id_above_ood():
    """Higher = more ID: ID near the prototypes vs OOD far from every prototype or with abnormal activations."""
    rng = np.random.default_rng(3)
    C, L = 3, 12
    centers = np.zeros((C, L))
    for c in range(C):
        centers[c, 4 * c : 4 * c + 4] = 1.0
    labels = np.arange(60) % C
    train = np.maximum(centers[labels] + rng.normal(0, 0.15, (60, L)), 0)
    test_id = np.maximum(centers[np.arange(30) % C] + rng.normal(0, 0.15, (30, L)), 0)
    spread = np.abs(rng.normal(0, 1, (15, L)))
    spread *= 2.0 / np.linalg.norm(spread, axis=1, keepdims=True)  # same norm as ID (2), but no class direction
    spiky = np.zeros((15, L))
    spiky[np.arange(15), rng.integers(0, L, 15)] = rng.uniform(5, 10, 15)  # one abnormal unit
    W = 2 * centers - 0.5 + rng.normal(0, 0.1, (C, L))
    p = make_problem(train, labels, np.r_[test_id, spread, spiky], W, np.zeros(C))
    scores = score_with("fmls", p)
    assert scores[:30].min() > scores[30:].max()


# ============================================================================================ ReAct, BATS
def test_react_threshold_is_the_90th_percentile_of_all_training_activations(prob):
    t = np.percentile(prob.train64.ravel(), 90)
    assert (prob.test64 > t).any()  # the clip is active
    expected = ref_logsumexp(ref_react_logits(prob.test64, prob.W, prob.b, t))
    react = score_with("react", prob)
    assert_scores(react, expected)
    np.testing.assert_array_equal(score_with("energy_react", prob), react)
    scorer = build_scorer("react").fit(prob.train, prob.labels, prob.head)
    assert scorer.threshold == pytest.approx(t, rel=1e-12)
    assert differs(react, ref_logsumexp(prob.logits.double().numpy()))  # clipping changed the scores


@pytest.mark.parametrize(
    ("name", "kwargs", "threshold", "output"),
    [
        ("react", {"percentile": 75}, "p75", "energy"),
        ("react", {"clip": 0.7}, 0.7, "energy"),
        ("react", {"clip": 0.0}, 0.0, "energy"),
        ("msp_react", {}, "p90", "msp"),
        ("msp_react", {"clip": 1.2}, 1.2, "msp"),
    ],
)
def test_react_variants(prob, name, kwargs, threshold, output):
    if isinstance(threshold, str):
        threshold = np.percentile(prob.train64.ravel(), float(threshold[1:]))
    expected = ref_output(ref_react_logits(prob.test64, prob.W, prob.b, threshold), output)
    assert_scores(score_with(name, prob, **kwargs), expected)


@pytest.mark.parametrize("lam", [3.25, 1.0, 0.5, 0.0])
def test_bats_truncates_to_training_mean_plus_minus_lam_std(prob, lam):
    L = prob.train64.shape[1]
    n = len(prob.train64)
    mu = np.array([sum(prob.train64[:, u]) / n for u in range(L)])
    sd = np.array([math.sqrt(sum((v - mu[u]) ** 2 for v in prob.train64[:, u]) / n) for u in range(L)])
    np.testing.assert_allclose(sd, prob.train64.std(axis=0, ddof=0))
    lo, hi = mu - lam * sd, mu + lam * sd
    truncated = np.stack([[min(max(x[u], lo[u]), hi[u]) for u in range(L)] for x in prob.test64])
    if lam < 1:
        assert (prob.test64 < lo).any()  # the lower bound is active too
    assert (prob.test64 > hi).any()
    expected = ref_logsumexp(np.stack([prob.W @ x + prob.b for x in truncated]))
    actual = score_with("bats", prob, lam=lam, statistics="empirical")
    assert_scores(actual, expected)
    assert differs(actual, ref_logsumexp(prob.logits.double().numpy()))  # the truncation is active


def test_bats_with_ddof1_std_would_differ(prob):
    lam = 1.0
    mu, sd1 = prob.train64.mean(0), prob.train64.std(0, ddof=1)
    wrong = ref_logsumexp(np.stack([prob.W @ np.clip(x, mu - lam * sd1, mu + lam * sd1) + prob.b for x in prob.test64]))
    assert differs(score_with("bats", prob, lam=lam, statistics="empirical"), wrong, 1e-4)


# ============================================================================================ DICE
@pytest.mark.parametrize(
    ("name", "kwargs", "ref"),
    [
        ("dice", {}, {"p": 90}),
        ("dice", {"percentile": 70}, {"p": 70}),
        ("dice", {"percentile": 33.3}, {"p": 33.3}),
        ("dice", {"percentile": 0}, {"p": 0}),
        ("dice", {"percentile": 100}, {"p": 100}),
        ("dice_react", {}, {"p": 90, "clip": "p90"}),
        ("dice_react", {"percentile": 50, "clip_percentile": 80}, {"p": 50, "clip": "p80"}),
        ("dice", {"clip": 0.9}, {"p": 90, "clip": 0.9}),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_dice_matches_reference(name, kwargs, ref, seed):
    p = random_problem(seed)
    ref = dict(ref)
    if isinstance(ref.get("clip"), str):
        ref["clip"] = np.percentile(p.train64.ravel(), float(ref["clip"][1:]))  # clip first
    mean_h = np.array([sum(p.train64[:, u]) / len(p.train64) for u in range(p.train64.shape[1])])  # unclipped
    expected = ref_logsumexp(ref_dice_logits(p.test64, p.W, p.b, mean_h, **ref))
    assert_scores(score_with(name, p, **kwargs), expected)


def test_dice_one_global_strict_threshold_and_whole_bias():
    # 3 x 7 = 21 contributions, p = 50 -> virtual index 10 exactly: the threshold IS the 11th smallest value, which is
    # tied three times (sorted positions 9, 10, 11). Strict '>' drops all three; '>=' would keep them.
    # Every unit's training mean is exactly 1 (rows alternate 0.5 / 1.5), so the contributions are W exactly.
    values = np.arange(21) * 0.25 - 2.0  # the tied value is 0.5 (non-zero: keeping it would matter)
    values[9] = values[11] = values[10]
    W = np.random.default_rng(2).permutation(values).reshape(3, 7)
    train = np.tile([[0.5] * 7, [1.5] * 7], (6, 1))
    test = np.random.default_rng(4).uniform(0.5, 2.0, (9, 7))
    b = np.array([0.3, -0.7, 1.1])
    p = make_problem(train, np.arange(12) % 3, test, W, b)
    mean_h = p.train64.mean(0)
    assert (mean_h == 1).all()
    scorer = build_scorer("dice", percentile=50).fit(p.train, p.labels, p.head)
    kept = scorer.sparse_weight != 0
    assert int(kept.sum()) == 9  # 21 - 9 below - 3 tied at the threshold
    weight = p.W
    assert torch.equal(kept, torch.from_numpy(weight > values[10]))
    actual = scorer.score(p.test, p.logits).double().numpy()
    assert_scores(actual, ref_logsumexp(ref_dice_logits(p.test64, p.W, p.b, mean_h, 50)))
    assert differs(actual, ref_logsumexp(ref_dice_logits(p.test64, p.W, p.b, mean_h, 50, tie_rule=">=")))
    # p = 100 drops every weight: the logits are the whole bias.
    everything_dropped = score_with("dice", p, percentile=100)
    np.testing.assert_allclose(everything_dropped, ref_logsumexp(np.tile(b, (9, 1))), rtol=1e-6)


def test_dice_threshold_is_global_not_per_class(prob):
    mean_h = prob.train64.mean(0)
    contrib = prob.W * mean_h[None, :]
    per_row = np.stack([np.where(row > np.percentile(row, 90), w, 0) for row, w in zip(contrib, prob.W, strict=True)])
    wrong = ref_logsumexp(np.stack([per_row @ x + prob.b for x in prob.test64]))
    assert differs(score_with("dice", prob), wrong)


# ============================================================================================ LINE
LINE_CASES = [
    ("line", {}, {"p_w": 90, "p_a": 90, "clip": 1.0}),
    ("line", {"activation_percentile": 10}, {"p_w": 90, "p_a": 10, "clip": 1.0}),
    ("line", {"weight_percentile": 10, "activation_percentile": 10, "clip": 0.8}, {"p_w": 10, "p_a": 10, "clip": 0.8}),
    ("line", {"weight_percentile": 55.5, "activation_percentile": 33.3, "clip": None}, {"p_w": 55.5, "p_a": 33.3}),
    ("line", {"weight_percentile": 0, "activation_percentile": 0}, {"p_w": 0, "p_a": 0, "clip": 1.0}),
    ("line_ls", {}, {"p_w": 90, "p_a": 90, "clip": 1.0, "smooth": True}),
    (
        "line_ls",
        {"weight_percentile": 10, "activation_percentile": 10},
        {"p_w": 10, "p_a": 10, "clip": 1.0, "smooth": True},
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "ref"), LINE_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_line_matches_reference(name, kwargs, ref, seed):
    p = random_problem(seed)
    ref = {"clip": None, **ref}
    expected = ref_logsumexp(ref_line_logits(p.test64, p.W, p.b, p.train64, p.labels64, **ref))
    assert_scores(score_with(name, p, **kwargs), expected)


@pytest.mark.parametrize("name", ["line", "line_ls"])
def test_line_without_the_stored_masked_heads_scores_the_same(name):
    """Large heads (ImageNet: C x C x L = 2G floats) build each class's masked head per batch rather than store them."""
    p = random_problem(3)
    scorer = build_scorer(name, weight_percentile=60, activation_percentile=40).fit(p.train, p.labels, p.head)
    assert scorer.masked_weights is not None
    kept = scorer.score(p.test, p.logits)
    scorer.masked_weights = None
    np.testing.assert_array_equal(scorer.score(p.test, p.logits).numpy(), kept.numpy())
    ref = {"p_w": 60, "p_a": 40, "clip": 1.0, "smooth": name == "line_ls"}
    expected = ref_logsumexp(ref_line_logits(p.test64, p.W, p.b, p.train64, p.labels64, **ref))
    assert_scores(kept.double().numpy(), expected)


def test_line_fitted_again_uses_the_new_head():
    first, second = random_problem(3), random_problem(4)
    refitted = build_scorer("line").fit(first.train, first.labels, first.head)
    refitted.fit(second.train, second.labels, second.head)
    fresh = build_scorer("line").fit(second.train, second.labels, second.head)
    np.testing.assert_array_equal(refitted.score(second.test, second.logits), fresh.score(second.test, second.logits))


def test_line_predicts_from_clipped_features_and_smooths_with_the_original_class():
    p0 = random_problem(1)
    test = p0.test64.copy()
    for i in range(len(test)):  # a huge unit that favours one class before clipping
        c = i % p0.num_classes
        test[i, int(np.argmax(p0.W[c] - p0.W.mean(0)))] = 30.0
    p = make_problem(p0.train64, p0.labels64, test, p0.W, p0.b)
    original = np.argmax(p.test64 @ p.W.T + p.b, axis=1)
    clipped = np.argmax(np.minimum(p.test64, 1.0) @ p.W.T + p.b, axis=1)
    assert (original != clipped).sum() >= 3
    args = (p.test64, p.W, p.b, p.train64, p.labels64)
    for name, smooth in [("line", False), ("line_ls", True)]:
        actual = score_with(name, p, weight_percentile=60, activation_percentile=40)
        ref = {"p_w": 60, "p_a": 40, "clip": 1.0, "smooth": smooth}
        assert_scores(actual, ref_logsumexp(ref_line_logits(*args, **ref)))
        wrong = ref_logsumexp(ref_line_logits(*args, class_from="original", **ref))
        assert differs(actual[original != clipped], wrong[original != clipped])


# ============================================================================================ Mahalanobis
def test_mahalanobis_matches_sklearn_and_pinv(prob):
    expected = ref_mahalanobis(prob.test64, prob.train64, prob.labels64, prob.num_classes)
    assert_scores(score_with("mahalanobis", prob), expected)
    assert (expected < 0).all()


def ref_gaussian_scores(name: str, train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int):
    """The Mahalanobis family from centred numpy covariances and scipy's ``pinvh`` (sklearn's): ``mahalanobis``,
    ``rmds`` and, on L2-normalised features, ``mahalanobis_pp`` and ``rmds_pp``."""
    if name.endswith("_pp"):
        norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)  # noqa: E731
        train, test = norm(train), norm(test)
    means = np.stack([train[labels == c].mean(0) for c in range(classes)])
    centred = train - means[labels]
    precision = pinvh(centred.T @ centred / len(train))
    d = np.stack([np.einsum("ij,jk,ik->i", test - m, precision, test - m) for m in means], axis=1)  # (N, C)
    if not name.startswith("rmds"):
        return -d.min(1)
    mean = train.mean(0)
    background = pinvh((train - mean).T @ (train - mean) / len(train))
    d0 = np.einsum("ij,jk,ik->i", test - mean, background, test - mean)
    return -(d - d0[:, None]).min(1)


GAUSSIAN_SCORERS = ["mahalanobis", "rmds", "mahalanobis_pp", "rmds_pp"]


@pytest.mark.parametrize("name", GAUSSIAN_SCORERS)
@pytest.mark.parametrize("case", ["dead-unit", "duplicate-unit", "more-units-than-samples", "offset-features"])
def test_gaussian_scorers_on_singular_covariances_match_a_pinvh_reference(case, name):
    """Rank-deficient covariances: dead and duplicated units, fewer images than units (rounding noise of either sign
    in the null space, which a default-cutoff pseudo-inverse turned into scores of 1e16), and features far from 0
    (the textbook E[hh^T] - mu mu^T leaves noise of the size of mu^2): the scores are those of centred numpy
    covariances and scipy's pinvh."""
    p0 = random_problem(2, n_train=48 if case != "more-units-than-samples" else 8, dim=10)
    train, test = p0.train64.copy(), p0.test64.copy()
    if case == "dead-unit":
        train[:, 3] = 0.0
        test[:, 3] = 0.0
    elif case == "duplicate-unit":
        train[:, 5] = train[:, 4]
        test[:, 5] = test[:, 4]
    elif case == "offset-features":  # every feature around 300, a spread of ~1, one constant unit
        train, test = train + 300.0, test + 300.0
        train[:, 2] = test[:, 2] = 300.0
    p = make_problem(train, p0.labels64, test, p0.W, p0.b)
    scores = score_with(name, p)
    assert np.isfinite(scores).all()
    expected = ref_gaussian_scores(name, p.train64, p.labels64, p.test64, p.num_classes)
    scale = np.abs(expected).max()
    assert_scores(scores, expected, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("name", GAUSSIAN_SCORERS)
def test_gaussian_scorers_refuse_one_image_per_class(name):
    """One training image per class: the within-class covariance is zero (every image is its class mean), and a
    pseudo-inverse of it would score noise (a constant, or whatever the rounding gives): refused, saying why."""
    p0 = random_problem(3, num_classes=4, n_train=4, dim=10)
    with pytest.raises(FitError, match=r"within-class covariance of its 4 training images \(4 classes, one image "
                                       r"each\) is zero up to rounding: it needs two different images of one class "
                                       r"at least \(5 images or more\)"):  # fmt: skip
        build_scorer(name).fit(p0.train, p0.labels, p0.head)


# ============================================================================================ ODIN
class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)
        with torch.no_grad():
            self.conv.weight[:, 2] = 0  # channel 2 is ignored: its input gradient is exactly zero

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)).mean(dim=(2, 3))


STD = (0.25, 0.5, 0.2)


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


# ============================================================================================ registry
def test_unknown_scorer_lists_choices():
    with pytest.raises(ConfigError, match="Unknown scorer 'nope'") as info:
        build_scorer("nope")
    for name in SCORERS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("fmls", {"foo": 1}, "foo"),
        ("msp", {"temperature": 2}, "temperature"),
        ("odin_fmls", {"lam": 1}, "lam"),
        ("odin", {"percentile": 50}, "percentile"),
        ("fmls", {"percentile": 101}, "percentile"),
        ("fmls", {"percentile": -1}, "percentile"),
        ("fmls", {"clip_percentile": 100.5}, "clip_percentile"),
        ("react", {"percentile": 101}, "percentile"),
        ("react", {"percentile": -1}, "percentile"),
        ("dice", {"percentile": 101}, "percentile"),
        ("dice", {"percentile": -1}, "percentile"),
        ("dice_react", {"clip_percentile": -1}, "clip_percentile"),
        ("line", {"weight_percentile": 101}, "weight_percentile"),
        ("line", {"activation_percentile": -1}, "activation_percentile"),
        ("odin_fmls", {"percentile": 101}, "percentile"),
        ("fmls", {"clip": -0.1}, "clip"),
        ("react", {"clip": -1.0}, "clip"),
        ("dice", {"clip": -1.0}, "clip"),
        ("line", {"clip": -1.0}, "clip"),
        ("odin_react", {"clip": -1.0}, "clip"),
        ("bats", {"lam": -1.0}, "lam"),
        ("odin", {"temperature": 0}, "temperature"),
    ],
)
def test_build_scorer_rejects_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_scorer(name, **kwargs)


@pytest.fixture(scope="module")
def resnet():
    """A random ResNet-20, 48 training images of 4 classes and 6 test images: the one-pass path of every scorer."""
    from lightning_ood.models import build_backbone

    torch.manual_seed(0)
    net = build_backbone("resnet20", 4).eval()
    images, labels = torch.randn(48, 3, 32, 32), torch.arange(48) % 4
    return SimpleNamespace(net=net, images=images, labels=labels, x=torch.randn(6, 3, 32, 32))


def engine_scores(name: str, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, x: torch.Tensor):
    """The scores of ``x`` by the registered scorer ``name`` through the evaluation engine, as the test pass runs it:
    the statistics it declares (composed scorers: their parts' too) on ``images``, its reference images, fitted,
    then one engine call, in the network's own precision."""
    from lightning_ood.data.base import IndexedDataset
    from lightning_ood.engine import Engine, FitContext, accumulate_statistics
    from lightning_ood.statistics import FeatureSet

    settings = {**QUICK_SETTINGS.get(name, {}), **({"block": "layer1.0"} if name == "featurenorm" else {})}
    engine = Engine(net, {name: {"scorer": name, **settings}}, std=(0.25, 0.25, 0.25))
    dataset = IndexedDataset(torch.utils.data.TensorDataset(images, labels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    stats = accumulate_statistics(net, loader, engine.needs.statistics, progress=False)
    with torch.no_grad():
        reference = net.features(images[:20])
    for ref in engine.needs.references:
        stats.reference[ref] = FeatureSet(reference, net.head(reference), labels[:20])
    # mahalanobis_paper and nac fit on ID training images, adascale on the (here: training) id_val images
    context = FitContext(net, lambda count, seed: loader, reference_images=lambda reference: loader)
    _, scores = engine.fit(stats, context)(x)
    return scores[name]


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_registered_scorer_builds_fits_and_scores(name, resnet):
    """Each registered scorer through the evaluation engine: finite (N,) scores."""
    scores = engine_scores(name, resnet.net, resnet.images, resnet.labels, resnet.x)
    assert scores.shape == (6,) and scores.dtype.is_floating_point and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", list(SCORERS))
def test_no_scorer_ties_in_float32_what_float64_tells_apart(name, resnet):
    """Confident predictions (the head scaled so that most logit gaps exceed 20) scored in float32, and with the same
    network cast to float64: the float32 scores take as many distinct values as the float64 ones (one fewer allowed:
    two scores that happen to fall within float32's resolution). A softmax probability rounded to 1.0 (a float32
    MSP of most of these images), a ``1 - regret`` rounded to 1 (pNML), a probability clipped at 1 - 1e-7 would tie
    them, and ties change AUROC and FPR."""
    confident = copy.deepcopy(resnet.net)
    with torch.no_grad():
        confident.head.weight.mul_(150)
        confident.head.bias.mul_(150)
    generator = torch.Generator().manual_seed(1)
    images, x = torch.randn(48, 3, 12, 12, generator=generator), torch.randn(32, 3, 12, 12, generator=generator)
    single = engine_scores(name, confident, images, resnet.labels, x).double()
    double = engine_scores(name, copy.deepcopy(confident).double(), images.double(), resnet.labels, x.double())
    distinct_single, distinct_double = single.unique().numel(), double.unique().numel()
    assert distinct_single >= distinct_double - 1, (
        f"{distinct_single} distinct float32 scores, {distinct_double} in float64"
    )


# ============================================================================================ statistics
def test_feature_statistics_against_numpy(prob):
    stats = FeatureStatistics.from_features(prob.train, prob.labels, prob.num_classes)
    x, y = prob.train64, prob.labels64
    np.testing.assert_array_equal(stats.counts.numpy(), [sum(y == c) for c in range(prob.num_classes)])
    np.testing.assert_allclose(stats.class_means.numpy(), ref_class_means(x, y, prob.num_classes), rtol=1e-12)
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std.numpy(), x.std(0, ddof=0), rtol=1e-10)
    centred = np.concatenate([x[y == c] - x[y == c].mean(0) for c in range(prob.num_classes)])
    cov = EmpiricalCovariance(assume_centered=False).fit(centred).covariance_
    np.testing.assert_allclose(stats.covariance.numpy(), cov, rtol=1e-9, atol=1e-12)
    assert stats.num_classes == prob.num_classes and stats.feature_dim == x.shape[1] and stats.num_samples == len(x)


@pytest.mark.parametrize("q", [0, 0.1, 10, 33.3, 50, 72.5, 90, 99.9, 100])
def test_activation_percentile_is_numpy_percentile(prob, q):
    stats = FeatureStatistics.from_features(prob.train, prob.labels)
    flat32 = prob.train.numpy().ravel()
    assert stats.activation_percentile(q) == pytest.approx(np.percentile(flat32.astype(np.float64), q), rel=1e-12)
    assert stats.activation_percentile(q) == pytest.approx(float(np.percentile(flat32, q)), rel=1e-6)


def test_activation_percentile_off_grid_or_out_of_range(prob):
    stats = FeatureStatistics.from_features(prob.train, prob.labels)
    for bad in (0.05, 90.01, 101, -1):
        with pytest.raises(ValueError, match="percentile"):
            stats.activation_percentile(bad)


def test_activation_percentile_of_float64_features_is_exact():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.gamma(2.0, 1.0, (50, 7)))  # float64
    stats = FeatureStatistics.from_features(features, torch.arange(50) % 3)
    for q in (10, 33.3, 90):
        assert stats.activation_percentile(q) == pytest.approx(np.percentile(features.numpy().ravel(), q), rel=1e-12)


def test_statistics_need_every_class():
    features = torch.rand(6, 3)
    with pytest.raises(ValueError, match=r"classes \[3\] have no training images"):
        FeatureStatistics.from_features(features, torch.tensor([0, 1, 2, 0, 1, 2]), num_classes=4)
    with pytest.raises(ValueError, match="labels"):
        FeatureStatistics.from_features(features, torch.tensor([0, 1, 2, 0, 1, 5]), num_classes=4)


def test_batched_accumulation_equals_one_batch():
    rng = np.random.default_rng(9)
    features = torch.from_numpy(np.maximum(rng.normal(0.5, 1, (203, 9)), 0)).double()
    labels = torch.from_numpy(rng.integers(0, 5, 203))
    labels[:5] = torch.arange(5)
    one = StatisticsAccumulator(5, 9)
    one.update(features, labels)
    expected = one.compute()
    many = StatisticsAccumulator(5, 9)
    for rows in np.array_split(rng.permutation(203), [1, 17, 18, 90, 150]):
        many.update(features[rows], labels[rows])
    result = many.compute()
    for key, value in expected.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(result.state_dict()[key], value, rtol=1e-10, atol=1e-10, msg=key)
    assert torch.equal(result.activation_quantiles, expected.activation_quantiles)


def test_quantile_stride_keeps_every_strided_index():
    rng = np.random.default_rng(10)
    features = torch.from_numpy(rng.gamma(2.0, 1.0, (100, 6)).astype(np.float32))
    labels = torch.from_numpy(np.arange(100) % 3)
    indices = torch.from_numpy(rng.permutation(100) + 1000)  # dataset indices, not positions
    acc = StatisticsAccumulator(3, 6, quantile_stride=3)
    for rows in np.array_split(np.arange(100), 7):
        acc.update(features[rows], labels[rows], indices[rows])
    stats = acc.compute()
    kept = features[indices % 3 == 0].double().numpy().ravel()
    assert len(kept) == 6 * int((indices % 3 == 0).sum()) < 6 * 100
    for q in (0, 12.3, 50, 90, 100):
        assert stats.activation_percentile(q) == pytest.approx(np.percentile(kept, q), rel=1e-12)
    # Means still use every sample.
    np.testing.assert_allclose(stats.mean.numpy(), features.double().numpy().mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="indices"):
        acc.update(features, labels)


def test_percentile_matches_numpy_exactly():
    rng = np.random.default_rng(12)
    for case in range(400):
        ndim = rng.integers(1, 4)
        shape = tuple(int(s) for s in rng.integers(1, 9, ndim))
        x = rng.normal(0, 3, shape).astype(np.float32)
        if case % 3 == 0:
            x = np.round(x).astype(np.float32)  # ties
        dim = None if case % 2 else int(rng.integers(0, ndim))
        q = float(rng.choice([0.0, 100.0, 50.0, 90.0, 10.0, round(float(rng.uniform(0, 100)), 1), rng.uniform(0, 100)]))
        expected = np.percentile(x, q, axis=dim)
        actual = percentile(torch.from_numpy(x), q, dim).numpy()
        assert actual.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(actual, expected, err_msg=f"shape {shape} dim {dim} q {q!r}")
        x64 = x.astype(np.float64) * 1.1
        np.testing.assert_array_equal(
            percentile(torch.from_numpy(x64), q, dim).numpy(), np.percentile(x64, q, axis=dim)
        )


def test_percentile_with_several_p():
    rng = np.random.default_rng(13)
    x = rng.normal(0, 1, (4, 11)).astype(np.float32)
    qs = [0.0, 7.5, 33.3, 50.0, 90.0, 100.0]
    flat = percentile(torch.from_numpy(x), torch.tensor(qs, dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(flat, [np.percentile(x, q) for q in qs])
    rows = percentile(torch.from_numpy(x), torch.tensor(qs, dtype=torch.float64), dim=1).numpy()  # (4, len(qs))
    np.testing.assert_array_equal(rows, np.stack([np.percentile(x, q, axis=1) for q in qs], axis=1))
    with pytest.raises(ValueError, match="empty"):
        percentile(torch.empty(0), 50.0)
