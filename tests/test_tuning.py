"""Hyperparameter selection (Section V-F) and sensitivity sweeps (lightning_ood/tuning.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch import nn

from lightning_ood.features import FeatureSet
from lightning_ood.scoring.fmls import FMLS
from lightning_ood.scoring.line import LINE
from lightning_ood.scoring.shaping import ReAct
from lightning_ood.statistics import FeatureStatistics
from lightning_ood.tuning import Setting, ranked, select, sensitivity_sweeps, to_csv, tuned_scorers, with_average


def linear_head(weight, bias=None) -> nn.Linear:
    weight = torch.tensor(weight, dtype=torch.float32)
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else torch.tensor(bias))
    return head


def feature_set(h: torch.Tensor, head: nn.Linear) -> FeatureSet:
    with torch.no_grad():
        return FeatureSet(h, head(h), torch.zeros(len(h), dtype=torch.long))


def constructed_case():
    """Two units, two classes. Class 0 uses unit 0 (W[0] = [1, 0.5]: every p in 10..90 keeps only unit 0); its
    prototype is [1, 0]. ID validation features are [a, 0], a ~ U[0.5, 1.5] (cosine 1); noise features are [b, b],
    b ~ U[1, 3] (cosine 1/sqrt(2), predicted class 0). With the class-1 logit at 0 the score is increasing in
    s * min(h0, lambda): ID gives min(a, lambda), noise gives lambda / sqrt(2).

    - FPR95 = 0 iff lambda / sqrt(2) < min(a_5%, lambda) = min(0.55, lambda): lambda < 0.778;
    - AUROC = 1 iff every ID score beats every noise score: 0.5 > lambda / sqrt(2), lambda < 0.707.
    So on the grid below the optimum is lambda = 0.7 (the largest perfect lambda), p = 10 (p does not matter: the
    smallest wins the tie)."""
    head = linear_head([[1.0, 0.5], [0.0, 0.0]])
    stats = FeatureStatistics.from_features(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    a = torch.linspace(0.5, 1.5, 201)
    b = torch.linspace(1.0, 3.0, 201)
    id_val = feature_set(torch.stack([a, torch.zeros_like(a)], 1), head)
    noise = feature_set(torch.stack([b, b], 1), head)
    return stats, head, id_val, noise


def test_selection_picks_the_known_optimum():
    stats, head, id_val, noise = constructed_case()
    clips = [0.3, 0.6, 0.7, 0.75, 0.9, 1.2, 2.0]
    best, grid = select("fmls", FMLS.tuning, stats, head, id_val, noise, {"percentile": [10, 50, 90], "clip": clips})
    assert (dict(best.params)["percentile"], dict(best.params)["clip"]) == (10.0, 0.7)
    assert (best.fpr95, best.auroc) == (0.0, 1.0)
    by_clip = {dict(c.params)["clip"]: c for c in grid if dict(c.params)["percentile"] == 10}
    assert by_clip[0.75].fpr95 == 0.0 and by_clip[0.75].auroc < 1.0  # separates at 95% TPR, not everywhere
    assert by_clip[0.9].fpr95 == 1.0  # every noise image above the ID threshold
    assert len(grid) == 21


def test_selection_rule_order():
    def setting(p, clip, fpr95, auroc):
        return Setting((), (("percentile", p), ("clip", clip)), fpr95, auroc)

    candidates = [
        setting(90.0, 1.0, fpr95=0.20, auroc=1.00),
        setting(30.0, 0.8, fpr95=0.10, auroc=0.95),
        setting(60.0, 0.8, fpr95=0.10, auroc=0.97),
        setting(60.0, 1.0, fpr95=0.10, auroc=0.97),
        setting(40.0, 1.0, fpr95=0.10, auroc=0.97),
    ]
    order = ranked(candidates, FMLS.tuning)  # the rule FMLS declares (the paper's Section V-F)
    # lowest FPR first (0.10 beats 0.20 despite AUROC 1), then AUROC, then the larger lambda, then the smaller p
    assert [tuple(v for _, v in c.params) for c in order] == [(40.0, 1.0), (60.0, 1.0), (60.0, 0.8), (30.0, 0.8),
                                                              (90.0, 1.0)]  # fmt: skip


def test_lambda_grid_from_activation_percentiles():
    stats, head, id_val, noise = constructed_case()
    _, grid = select("fmls", FMLS.tuning, stats, head, id_val, noise, {"percentile": [60], "clip_percentile": [50, 90]})
    assert [dict(c.shown)["clip_percentile"] for c in grid] == [50, 90]
    assert [dict(c.params)["clip"] for c in grid] == [stats.activation_percentile(50), stats.activation_percentile(90)]


def test_selected_overlay_updates_the_paper_family_only():
    specs = {"fmls": ("fmls", {"percentile": 60, "clip_percentile": 90}), "ours_msp": ("msp_fmls", {}),
             "line": ("line", {"clip": 1.0}), "fm_ls": ("fm_ls", {}), "energy": ("energy", {})}  # fmt: skip
    out = tuned_scorers(specs, "fmls", {"percentile": 30.0, "clip": 0.8}, FMLS.tuning)
    assert out["fmls"] == {"scorer": "fmls", "percentile": 30.0, "clip": 0.8}
    assert out["ours_msp"] == {"scorer": "msp_fmls", "percentile": 30.0, "clip": 0.8}
    assert out["fm_ls"] == {"scorer": "fm_ls", "percentile": 30.0}  # no ReAct in this ablation
    assert out["line"] == {"scorer": "line", "clip": 1.0} and out["energy"] == {"scorer": "energy"}
    assert yaml.safe_load(yaml.safe_dump({"model": {"scorers": out}}))["model"]["scorers"] == out


def test_sweeps_against_a_direct_computation():
    rng = np.random.default_rng(0)
    head = linear_head(rng.normal(size=(3, 8)).tolist(), rng.normal(size=3).tolist())
    train = torch.tensor(rng.gamma(2.0, 0.5, (60, 8)), dtype=torch.float32)
    labels = torch.arange(60) % 3
    stats = FeatureStatistics.from_features(train, labels)
    id_test = feature_set(torch.tensor(rng.gamma(2.0, 0.5, (40, 8)), dtype=torch.float32), head)
    oods = {name: feature_set(torch.tensor(rng.gamma(shape, 0.7, (30, 8)), dtype=torch.float32), head)
            for name, shape in (("a", 1.0), ("b", 3.0))}  # fmt: skip
    # the paper's figures: lambda for fmls, LINE and ReAct; p for fmls with LINE as the flat reference
    points = sensitivity_sweeps(
        stats,
        head,
        id_test,
        oods,
        {"clip": [0.5, 1.0, 2.0]},
        {"fmls": (FMLS.tuning, {}), "line": (LINE.tuning, {}), "react": (ReAct.tuning, {})},
    )
    points += sensitivity_sweeps(stats, head, id_test, oods, {"percentile": [0, 50, 90]},
                                 {"fmls": (FMLS.tuning, {}), "line": (LINE.tuning, {})})  # fmt: skip
    assert len(points) == (3 * 3 + 3 * 2) * 2
    # one point recomputed by hand: fmls at p = 60, lambda = 1.0 on set "b"
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    protos = stats.class_means.numpy()

    def fmls(h):
        out = []
        for x in h.numpy():
            c = int(np.argmax(w @ x + b))
            keep = w[c] >= np.percentile(w[c], 60)
            f = w @ np.minimum(x * keep, 1.0) + b
            s = x @ protos[c] / (np.linalg.norm(x) * np.linalg.norm(protos[c]))
            out.append(np.log(np.exp(s * f).sum()))
        return np.array(out)

    s_id, s_ood = fmls(id_test.features), fmls(oods["b"].features)
    expected = roc_auc_score(np.r_[np.ones(40), np.zeros(30)], np.r_[s_id, s_ood])
    got = next(p for p in points if (p.sweep, p.scorer, p.value, p.ood) == ("clip", "fmls", 1.0, "b"))
    assert got.auroc == pytest.approx(expected, abs=1e-6)
    lines = [p for p in points if p.sweep == "percentile" and p.scorer == "line" and p.ood == "a"]
    assert len({(p.fpr95, p.auroc) for p in lines}) == 1  # LINE is the constant reference of the p sweep
    averaged = with_average(points)
    avg = next(p for p in averaged if (p.sweep, p.scorer, p.value, p.ood) == ("clip", "fmls", 1.0, "Average"))
    pair = [p for p in points if (p.sweep, p.scorer, p.value) == ("clip", "fmls", 1.0)]
    assert avg.fpr95 == pytest.approx(sum(p.fpr95 for p in pair) / 2)
    assert to_csv(averaged).splitlines()[0] == "sweep,scorer,value,ood,fpr95,auroc"
