"""The paper's method, FMLS, and its ablations and combinations (lightning_ood/scoring/fmls.py) against a numpy
reference written here (explicit loops, np.percentile): hand-computed cases, ties at the mask threshold, the class
from the original logits, the cosine of the raw feature, and the wrong variants the reference can compute.

Conventions: h (N, L) post-ReLU pooled features, head W (C, L) and b (C,); higher score = more in-distribution.
The references never call the project's helpers (``percentile``, ``class_weight_mask``, ``prototype_cosine``, ...)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_ood.scoring import build_scorer, class_weight_mask
from lightning_ood.scoring.fmls import CPU_BLOCK
from tests.helpers import make_problem, random_problem
from tests.scoring.conftest import assert_scores, differs, score_with
from tests.scoring.references import ref_cosine, ref_logsumexp, ref_output

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


# ============================================================================================ numpy references


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
