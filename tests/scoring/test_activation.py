"""ASH, SCALE and RankFeat (lightning_ood/scoring/activation.py) against numpy and pytorch-ood 0.4 on the pooled
feature and on the final feature map, and as their authors compute them:

- ASH: andrijazz/ash ``ash.py`` (``ash_p``, ``ash_b``, ``ash_s``) applied after the global pooling
  (``models/resnet_imagenet.py`` ``_forward_impl``: ``avgpool`` -> ``apply_ash`` -> ``flatten`` -> ``fc``); CIFAR
  settings from ``config/cifar10_config.yml`` (``ash_s@95``).
- SCALE: kai422/SCALE ``openood/networks/scale_net.py`` (``scale`` on the backbone's pooled feature), percentile 85
  (``configs/postprocessors/scale.yml``).
- RankFeat: KingJamesSong/RankFeat ``test_ood_resnetv2.py`` ``iterate_data_rankfeat`` and OpenOOD
  ``rankfeat_postprocessor.py``: the rank-1 part removed from Block-4 and, apart, from Block-3 (then Block-4), the
  two paths' logits averaged, ``T logsumexp(logits / T)``.

pytorch-ood 0.4's scores are outlier scores (higher = OOD): ours are their negatives, up to the factors each test
names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from torch import nn

from lightning_ood.engine import Engine
from lightning_ood.hooks import block_outputs
from lightning_ood.models import build_backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.activation import rank1_removed_mean
from lightning_ood.scoring.base import Batch
from lightning_ood.statistics import FeatureStatistics
from tests.scoring.conftest import close, energy, ours, theirs

pytorch_ood = pytest.importorskip("pytorch_ood.detector")


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


def map_scores(network, name, **kwargs):
    stats = FeatureStatistics.from_features(network.features, torch.arange(6) % 4, 4, network.net.head)
    scorer = build_scorer(name, **kwargs).bind(network.net).fit_statistics(stats, network.net.head)
    with torch.no_grad(), block_outputs(network.net, scorer.needs_blocks) as blocks:
        features = network.net.features(network.x)
    with torch.no_grad():  # after the capture, as the engine scores (RankFeat runs the network's last stages again)
        return scorer(Batch(features, network.net.head(features), blocks, inputs=network.x)).double().numpy()


def final_map(network, x: torch.Tensor | None = None) -> np.ndarray:
    """The last block's output. ``final_map(network)``: the ``network`` fixture's batch, read independently of
    the scorers' capture (a hook on the block). ``final_map(net, x)``: a CIFAR ResNet's last stage output on
    ``x``, written out: the stem, then every stage."""
    if x is not None:
        net = network
        with torch.no_grad():
            out = F.relu(net.bn1(net.conv1(x)))
            for stage in net.layers:
                out = stage(out)
        return out.double().numpy()
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
    is checked against the authors' code in this module too."""
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
    default is checked against the authors' code in this module too)."""
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


def head_numpy(net: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    return net.head.weight.detach().double().numpy(), net.head.bias.detach().double().numpy()


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


@pytest.mark.parametrize(("name", "method"), [("ash_p_map", "ASH"), ("scale_map", "SCALE")])
def test_the_map_variants_refuse_a_network_without_a_final_feature_map(name, method):
    from lightning_ood.errors import ConfigError
    from lightning_ood.models.base import Backbone

    class NoBN(Backbone):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

    with pytest.raises(ConfigError) as refused:
        build_scorer(name).bind(NoBN())
    assert str(refused.value) == (
        f"{method} on the feature map needs a network with a final feature map, and NoBN has none: use where: pooled "
        f"(the authors' placement)."
    )
