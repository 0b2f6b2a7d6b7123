"""ASH, SCALE, RankFeat and ViM as their authors compute them, each against a re-implementation (numpy, with the
network's own layers where the authors run the rest of the network) written from the authors' released code:

- ASH: andrijazz/ash ``ash.py`` (``ash_p``, ``ash_b``, ``ash_s``) applied after the global pooling
  (``models/resnet_imagenet.py`` ``_forward_impl``: ``avgpool`` -> ``apply_ash`` -> ``flatten`` -> ``fc``); CIFAR
  settings from ``config/cifar10_config.yml`` (``ash_s@95``).
- SCALE: kai422/SCALE ``openood/networks/scale_net.py`` (``scale`` on the backbone's pooled feature), percentile 85
  (``configs/postprocessors/scale.yml``).
- RankFeat: KingJamesSong/RankFeat ``test_ood_resnetv2.py`` ``iterate_data_rankfeat`` and OpenOOD
  ``rankfeat_postprocessor.py``: the rank-1 part removed from Block-4 and, apart, from Block-3 (then Block-4), the
  two paths' logits averaged, ``T logsumexp(logits / T)``.
- ViM: haoqiwang/vim ``benchmark.py`` (its principal-dimension rule, ``EmpiricalCovariance(assume_centered=True)``
  around ``u = -pinv(W) b``, alpha from the training features).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from torch import nn

from lightning_ood.engine import Engine
from lightning_ood.models import build_backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.subspace import default_dim
from lightning_ood.statistics import FeatureStatistics


def close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


def trained_like(net: nn.Module) -> nn.Module:
    """Eval mode with moving BatchNorm statistics other than the initial ones."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def engine_scores(net: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """The scores of the registered ``names`` at their defaults, through the evaluation engine (one forward pass)."""
    with torch.no_grad():
        features = net.features(x)
    stats = FeatureStatistics.from_features(features, torch.arange(len(x)) % net.num_classes, net.num_classes, net.head)
    engine = Engine(net, names).fit(stats)
    with torch.no_grad():
        _, scores = engine(x)
    return {name: score.double().numpy() for name, score in scores.items()}


def final_map(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """A CIFAR ResNet's last stage output, written out: the stem, then every stage."""
    with torch.no_grad():
        out = F.relu(net.bn1(net.conv1(x)))
        for stage in net.layers:
            out = stage(out)
    return out.double().numpy()


def head_numpy(net: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    return net.head.weight.detach().double().numpy(), net.head.bias.detach().double().numpy()


# ============================================================================================ ASH and SCALE
def authors_ash(x: np.ndarray, percentile: int, variant: str) -> np.ndarray:  # (N, C, H, W) -> (N, C, H, W)
    """andrijazz/ash ash.py: flatten each image, keep the top k = n - round(n p / 100), then P keeps them, B fills
    them with s1 / k, S prunes and multiplies everything by exp(s1 / s2)."""
    t = x.reshape(len(x), -1)
    n = t.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    s1 = t.sum(axis=1)
    top = np.argsort(-t, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(t)
    fill = np.repeat((s1 / k)[:, None], k, axis=1) if variant == "b" else np.take_along_axis(t, top, axis=1)
    np.put_along_axis(out, top, fill, axis=1)
    if variant == "s":
        out = out * np.exp(s1 / out.sum(axis=1))[:, None]
    return out.reshape(x.shape)


def authors_scale(x: np.ndarray, percentile: int) -> np.ndarray:  # (N, C, H, W) -> (N, C, H, W)
    """kai422/SCALE scale_net.py: the input multiplied by exp(s1 / s2), s2 the sum of the top k."""
    t = x.reshape(len(x), -1)
    n = t.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    s2 = -np.sort(-t, axis=1)[:, :k].sum(axis=1)
    return x * np.exp(t.sum(axis=1) / s2)[:, None, None, None]


@pytest.fixture(scope="module")
def resnet20():
    net = trained_like(build_backbone("resnet20", 4))
    torch.manual_seed(1)
    return net, torch.randn(6, 3, 32, 32)


def test_ash_and_scale_shape_the_pooled_feature_at_the_authors_cifar_percentiles(resnet20):
    """The registered defaults: the pooled feature (N, C, 1, 1), ASH-P 90, ASH-B 90, ASH-S 95, SCALE 85. The old
    defaults (the final 64 x 8 x 8 map, ASH-S 90) give other scores."""
    net, x = resnet20
    pooled = final_map(net, x).mean(axis=(2, 3), keepdims=True)  # (N, 64, 1, 1): where the authors apply apply_ash
    w, b = head_numpy(net)
    expected = {
        "ash_p": authors_ash(pooled, 90, "p"),
        "ash_b": authors_ash(pooled, 90, "b"),
        "ash_s": authors_ash(pooled, 95, "s"),
        "scale": authors_scale(pooled, 85),
    }
    ours = engine_scores(net, x, [*expected, "ash_s_map"])
    for name, shaped in expected.items():
        close(ours[name], logsumexp(shaped.reshape(len(x), -1) @ w.T + b, axis=1), rtol=1e-5, atol=1e-4)
    assert not np.allclose(ours["ash_s"], ours["ash_s_map"], rtol=1e-2)  # the map variant is another method
    assert all(build_scorer(name).bind(net).needs.blocks == () for name in expected)  # nothing but the features


def test_the_map_variants_shape_the_final_feature_map(resnet20):
    """``ash_s_map`` / ``scale_map``: ours, the same operations on the final map (64 x 8 x 8) before the pooling."""
    net, x = resnet20
    fmap = final_map(net, x)
    w, b = head_numpy(net)
    ours = engine_scores(net, x, ["ash_s_map", "scale_map"])
    pooled_s = authors_ash(fmap, 95, "s").mean(axis=(2, 3))
    pooled_scale = authors_scale(fmap, 85).mean(axis=(2, 3))
    close(ours["ash_s_map"], logsumexp(pooled_s @ w.T + b, axis=1), rtol=1e-5, atol=1e-4)
    close(ours["scale_map"], logsumexp(pooled_scale @ w.T + b, axis=1), rtol=1e-5, atol=1e-4)


# ============================================================================================ RankFeat
def rank1_removed_numpy(feat: torch.Tensor) -> torch.Tensor:
    """The authors' ``feat - s[:, 0:1] u[:, :, 0:1] v[:, 0:1, :]`` on (B, C, H*W), by numpy's SVD."""
    m = feat.double().flatten(2).numpy()
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    removed = m - s[:, :1, None] * (u[:, :, :1] @ vt[:, :1, :])
    return torch.from_numpy(removed).to(feat.dtype).view_as(feat)


def authors_rankfeat(block3, block4, last_stage, rest, head, temperature):
    """iterate_data_rankfeat: logits1 from Block-4 with its rank-1 part removed, logits2 from Block-3 with its
    rank-1 part removed then Block-4, logits = (logits1 + logits2) / 2, score T logsumexp(logits / T)."""
    with torch.no_grad():
        logits1 = head(rest(rank1_removed_numpy(block4))).double().numpy()
        logits2 = head(rest(last_stage(rank1_removed_numpy(block3)))).double().numpy()
    logits = (logits1 + logits2) / 2
    return temperature * logsumexp(logits / temperature, axis=1)


def pooled(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def rankfeat_scores(net: nn.Module, x: torch.Tensor, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``rankfeat`` (with ``kwargs``) and ``rankfeat_block4`` through the evaluation engine."""
    with torch.no_grad():
        features = net.features(x)
    stats = FeatureStatistics.from_features(features, torch.arange(len(x)) % net.num_classes, net.num_classes, net.head)
    engine = Engine(net, {"rankfeat": {"scorer": "rankfeat", **kwargs}, "rankfeat_block4": {}}).fit(stats)
    with torch.no_grad():
        _, scores = engine(x)
    return scores["rankfeat"].double().numpy(), scores["rankfeat_block4"].double().numpy()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rankfeat_averages_the_block3_and_block4_logits_on_the_cifar_resnet18(temperature):
    """Block-3 and Block-4 of the CIFAR ResNet-18 are ``layer3`` and ``layer4`` (OpenOOD's ResNet18_32x32
    ``intermediate_forward(x, 3)`` / ``(x, 4)``), followed by the average pooling and the head."""
    net = trained_like(build_backbone("resnet18", 4))
    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = F.relu(net.bn1(net.conv1(x)))
        for stage in net.layers[:3]:
            out = stage(out)
        block3, block4 = out, net.layers[3](out)
    expected = authors_rankfeat(block3, block4, net.layers[3], pooled, net.head, temperature)
    fused, block4_only = rankfeat_scores(net, x, temperature=temperature)
    close(fused, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(fused, block4_only, rtol=1e-3)  # Block-4 alone (the old default) is another score


def test_rankfeat_on_the_torchvision_resnet50_uses_layer3_and_layer4():
    """OpenOOD's ResNet-50 ``intermediate_forward``: ``layer3`` and ``layer4`` after the stem and max-pooling."""
    net = trained_like(build_backbone("resnet50", 3))
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    tv = net.net
    with torch.no_grad():
        out = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        block3 = tv.layer3(tv.layer2(tv.layer1(out)))
        block4 = tv.layer4(block3)
    expected = authors_rankfeat(block3, block4, tv.layer4, lambda z: torch.flatten(tv.avgpool(z), 1), net.head, 1.0)
    close(rankfeat_scores(net, x)[0], expected, rtol=1e-4, atol=1e-4)


def test_rankfeat_blocks_on_densenet():
    """DenseNet-BC (no authors' run): Block-4 is the final feature map ``relu(bn(.))``, Block-3 the last
    transition's output, the last dense block's input (as ``layer3`` is ``layer4``'s on the ResNets)."""
    net = trained_like(build_backbone("densenet100", 3))
    torch.manual_seed(4)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = net.conv1(x)
        out = net.transitions[0](net.dense[0](out))
        block3 = net.transitions[1](net.dense[1](out))

        def last_stage(z):
            return F.relu(net.bn(net.dense[2](z)))

        block4 = last_stage(block3)
    expected = authors_rankfeat(block3, block4, last_stage, pooled, net.head, 1.0)
    close(rankfeat_scores(net, x)[0], expected, rtol=1e-4, atol=1e-4)


# ============================================================================================ ViM
def authors_dim(feature_dim: int) -> int:
    """benchmark.py: 1000 from 2048-d features, 512 from 768-d, half the features below."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def test_vim_principal_dimension_follows_the_authors_rule():
    for dim in (2048, 4096, 1280, 1024, 800, 768, 767, 512, 342, 64):
        assert default_dim(dim) == authors_dim(dim), dim
    assert default_dim(1280) == 512  # MobileNetV2 (the old rule gave 1000)


def test_vim_and_residual_at_the_default_dimension_match_the_authors_computation():
    """800-d features (the rule's 768-2047 branch, MobileNetV2's 1280 included): D = 512 (the old rule: 400)."""
    rng = np.random.default_rng(0)
    n, dim, classes = 1200, 800, 6
    spectrum = 1.0 / (1.0 + np.arange(dim) / 40.0)  # distinct principal directions around D
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    train = np.maximum(rng.normal(size=(n, dim)) * spectrum @ basis.T + 0.3, 0)
    train = torch.tensor(train).half().float()  # the bank stores float16: the same features on both sides
    test = torch.tensor(np.maximum(rng.normal(size=(40, dim)) * 1.5 @ basis.T + 0.3, 0)).float()
    head = nn.Linear(dim, classes)
    labels = torch.arange(n) % classes
    stats = FeatureStatistics.from_features(train, labels, classes, head)
    with torch.no_grad():
        test_logits = head(test)
    vim = build_scorer("vim").fit_statistics(stats, head).score(test, test_logits).double().numpy()
    residual = build_scorer("residual").fit_statistics(stats, head).score(test, test_logits).double().numpy()

    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    x, t = train.double().numpy(), test.double().numpy()
    u = -np.linalg.pinv(w) @ b
    covariance = (x - u).T @ (x - u) / n  # EmpiricalCovariance(assume_centered=True).fit(x - u)
    values, vectors = np.linalg.eigh(covariance)  # their np.linalg.eig of a symmetric matrix: the same eigenpairs
    ns = vectors[:, np.argsort(-values)[authors_dim(dim) :]]
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((x - u) @ ns, axis=1).mean()
    vlogit = np.linalg.norm((t - u) @ ns, axis=1)
    close(vim, logsumexp(t @ w.T + b, axis=1) - alpha * vlogit, rtol=1e-4, atol=1e-4)
    close(residual, -vlogit, rtol=1e-4, atol=1e-4)
