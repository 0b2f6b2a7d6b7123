"""LINE and LINE + logit smoothing (lightning_ood/scoring/line.py) against a numpy reference written here (explicit
loops, np.percentile)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_ood.scoring import build_scorer
from tests.helpers import make_problem, random_problem
from tests.references import ref_class_means
from tests.scoring.conftest import assert_scores, differs, score_with
from tests.scoring.references import ref_cosine, ref_logsumexp

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


# ============================================================================================ numpy references


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
