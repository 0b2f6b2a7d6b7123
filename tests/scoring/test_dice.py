"""DICE and DICE+ReAct (lightning_ood/scoring/dice.py) against a numpy reference (explicit loops, np.percentile)
and pytorch-ood 0.4's DICE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ood.scoring import build_scorer
from tests.helpers import make_problem, random_problem
from tests.scoring.conftest import assert_scores, close, differs, ours, score_with, theirs
from tests.scoring.references import ref_logsumexp

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


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


@pytest.mark.numerics
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


@pytest.mark.numerics
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


@pytest.mark.numerics
def test_dice_threshold_is_global_not_per_class(prob):
    mean_h = prob.train64.mean(0)
    contrib = prob.W * mean_h[None, :]
    per_row = np.stack([np.where(row > np.percentile(row, 90), w, 0) for row, w in zip(contrib, prob.W, strict=True)])
    wrong = ref_logsumexp(np.stack([per_row @ x + prob.b for x in prob.test64]))
    assert differs(score_with("dice", prob), wrong)


@pytest.mark.parametrize("percentile", [10, 70, 90])
def test_dice_agrees_with_pytorch_ood(p, percentile):
    """Same mean training activation, one threshold over all C x L contributions, strict '>' (pytorch-ood's p is a
    fraction)."""
    dice = pytorch_ood.DICE(None, p.head.weight, p.head.bias, p=percentile / 100).fit_features(p.train, p.labels)
    close(ours(p, "dice", percentile=percentile), -theirs(dice.predict_features(p.test)), rtol=1e-5, atol=1e-5)
