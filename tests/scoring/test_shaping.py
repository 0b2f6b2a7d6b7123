"""ReAct and BATS (lightning_ood/scoring/shaping.py) against numpy references and pytorch-ood 0.4, and as their
authors compute them: BATS on the last BatchNorm's typical set (DenseNet3, OpenOOD's ResNet18_32x32, before the
residual addition), ReAct's threshold on held-out ID images (OpenOOD's ``react_postprocessor.py``) and on the ID
test images (the ReAct authors' run, through the CLI)."""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from torch import nn

from lightning_ood.hooks import block_outputs
from lightning_ood.models import build_backbone, pretrained_backbone
from lightning_ood.models.base import Backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.statistics import FeatureStatistics
from tests.helpers import run_cli
from tests.references import bn, densenet3_forward, densenet3_state, openood_resnet18_state
from tests.scoring.conftest import assert_scores, close, differs, ours, score_with, theirs
from tests.scoring.references import ref_logsumexp, ref_output

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


def ref_react_logits(h, W, b, threshold):
    return np.stack([W @ np.minimum(x, threshold) + b for x in h])


@pytest.mark.numerics
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


@pytest.mark.numerics
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


@pytest.mark.numerics
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


@pytest.mark.numerics
def test_bats_with_ddof1_std_would_differ(prob):
    lam = 1.0
    mu, sd1 = prob.train64.mean(0), prob.train64.std(0, ddof=1)
    wrong = ref_logsumexp(np.stack([prob.W @ np.clip(x, mu - lam * sd1, mu + lam * sd1) + prob.b for x in prob.test64]))
    assert differs(score_with("bats", prob, lam=lam, statistics="empirical"), wrong, 1e-4)


@pytest.mark.parametrize("clip", [0.5, 1.5, 4.0])
def test_react_agrees_with_pytorch_ood(p, clip):
    reference = pytorch_ood.ReAct(None, p.head, threshold=clip).predict_feature_maps(p.test)
    close(ours(p, "react", clip=clip), -theirs(reference))


X = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2


def energy(logits: torch.Tensor) -> np.ndarray:
    return torch.logsumexp(logits.double(), dim=1).numpy()


def bats_scores(net: Backbone, x: torch.Tensor, **params) -> np.ndarray:
    """What the one-pass test does: one forward pass with the scorer's hooks, then the scorer on that Batch."""
    stats = FeatureStatistics.from_features(net.features(x).detach(), torch.arange(len(x)) % net.num_classes,
                                            net.num_classes)  # fmt: skip
    scorer = build_scorer("bats", **params).bind(net).fit_statistics(stats, net.head)
    with torch.no_grad(), block_outputs(net, scorer.needs_blocks) as blocks:
        features = net.features(x)
        return scorer(Batch(features, net.head(features), blocks)).double().numpy()


@pytest.fixture(scope="module")
def densenet(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "dense.pth"
    state = densenet3_state()
    torch.save(state, path)
    return pretrained_backbone("densenet100", 10, str(path)).backbone.eval(), state


@pytest.mark.parametrize("lam", [0.2, 1.0])
def test_bats_on_densenet_truncates_the_final_batchnorm_output(densenet, lam):
    net, s = densenet
    beta, gamma = s["bn1.bias"], s["bn1.weight"]
    lower, upper = (beta - lam * gamma)[None, :, None, None], (beta + lam * gamma)[None, :, None, None]
    with torch.no_grad():
        _, logits = densenet3_forward(s, X, lambda z: torch.maximum(torch.minimum(z, upper), lower))
        h, plain = densenet3_forward(s, X)
    np.testing.assert_allclose(bats_scores(net, X, lam=lam), energy(logits), rtol=1e-4, atol=1e-4)
    assert np.abs(energy(logits) - energy(plain)).max() > 1e-3  # the truncation is active
    # bn_pooled: the same bounds on the pooled features (the authors' released code)
    pooled = F.linear(torch.maximum(torch.minimum(h, beta + lam * gamma), beta - lam * gamma), s["fc.weight"],
                      s["fc.bias"])  # fmt: skip
    np.testing.assert_allclose(bats_scores(net, X, lam=lam, statistics="bn_pooled"), energy(pooled), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def test_bats_on_a_resnet_truncates_before_the_residual_addition(tmp_path):
    s = openood_resnet18_state()
    torch.save(s, tmp_path / "r18.pth")
    net = pretrained_backbone("resnet18", 10, str(tmp_path / "r18.pth")).backbone.eval()
    lam = 0.5
    beta, gamma = s["layer4.1.bn2.bias"], s["layer4.1.bn2.weight"]
    with torch.no_grad():
        out = F.relu(bn(F.conv2d(X, s["conv1.weight"], padding=1), s, "bn1"))
        for i in range(1, 5):
            for j in range(2):
                p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
                y = F.relu(bn(F.conv2d(out, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn1"))
                y = bn(F.conv2d(y, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
                if p == "layer4.1":  # the last BatchNorm: its typical set, before the residual addition
                    y = torch.maximum(torch.minimum(y, (beta + lam * gamma)[None, :, None, None]),
                                      (beta - lam * gamma)[None, :, None, None])  # fmt: skip
                short = out
                if f"{p}.shortcut.0.weight" in s:
                    short = bn(F.conv2d(out, s[f"{p}.shortcut.0.weight"], stride=stride), s, f"{p}.shortcut.1")
                out = F.relu(y + short)
        logits = F.linear(F.adaptive_avg_pool2d(out, 1).flatten(1), s["fc.weight"], s["fc.bias"])
    np.testing.assert_allclose(bats_scores(net, X, lam=lam), energy(logits), rtol=1e-4, atol=1e-4)


def test_bats_on_torchvision_resnet50_and_mobilenet_reruns_only_the_tail():
    """The tail after the captured BatchNorm, with the identity bounds, reproduces the plain features."""
    for name in ("resnet50", "mobilenet_v2"):
        net = build_backbone(name, 5).eval()
        point = net.last_batchnorm()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad(), block_outputs(net, point.captures) as captured:
            features = net.features(x)
            torch.testing.assert_close(point.tail(captured[point.name], captured), features, rtol=1e-5, atol=1e-5)


def test_bats_needs_a_batchnorm():
    from lightning_ood.errors import ConfigError

    class NoBN(Backbone):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

    with pytest.raises(ConfigError, match="and NoBN has none: use \\{scorer: bats, statistics: empirical\\}"):
        build_scorer("bats").bind(NoBN())
    with pytest.raises(ConfigError, match="BATS statistics must be one of bn, bn_pooled, empirical"):
        build_scorer("bats", statistics="bn_empirical")


def test_react_threshold_from_id_test_images_through_the_cli(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = ["--data", "SyntheticDataModule", "--data.num_classes", "3", "--data.train_size", "30", "--data.test_size",
            "25", "--data.ood_sizes", '{"noise": 10}', "--model.backbone", "resnet20",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--checkpoint.dirpath", str(tmp_path / "ckpt")]  # fmt: skip
    run_cli("fit", *data, "--trainer.max_epochs", "1", "--model.scorers", "[msp]")
    caplog.clear()
    run_cli("test", *data, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--model.scorers",
            '{"react": {"reference": "id_test"}, "dice_react": {"reference": "id_test"}}')  # fmt: skip
    line = r"Reference 'id_test': 25 ID images measured \(90th activation percentile ([\d.]+)\)"
    logged = float(re.search(line, caplog.text, re.M)[1])
    # Independently: the 90th percentile (numpy) of all activations of the 25 ID test images under these weights.
    from lightning_ood.data import SyntheticDataModule

    dm = SyntheticDataModule(num_classes=3, train_size=30, test_size=25, ood_sizes={"noise": 10})
    dm.setup("test")
    net = build_backbone("resnet20", 3)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()})
    with torch.no_grad():
        features = net.eval().features(dm.test_sets["synthetic"].tensors[0])
    assert logged == pytest.approx(float(np.percentile(features.numpy().ravel(), 90)), abs=5e-5)
    assert logged != pytest.approx(float(checkpoint["ood_statistics"]["activation_quantiles"][900]), abs=1e-6)


def test_react_threshold_from_the_held_out_images(q):
    """OpenOOD's ``react_postprocessor.py``: ``np.percentile`` of every activation of the ID validation images
    (``id_loader_dict['val']``), then energy of the head on the clipped features."""
    c = np.percentile(q.val.ravel(), 90)
    expected = logsumexp(np.minimum(q.T, c) @ q.W.T + q.b, axis=1)
    np.testing.assert_allclose(ours(q, "react", reference="id_val"), expected, rtol=1e-5)
    assert c != pytest.approx(np.percentile(q.train.ravel(), 90), abs=1e-3)  # not the training threshold
