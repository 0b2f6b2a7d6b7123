"""Baselines computed as their authors do: BATS on the last BatchNorm's typical set, ReAct's threshold on ID test
images, NormRatio's jigsaw in pixel space; each against an independent computation written here."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ood.hooks import block_outputs
from lightning_ood.models import build_backbone, pretrained_backbone
from lightning_ood.models.base import Backbone
from lightning_ood.normalization import Normalization
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.featurenorm import norm_ratios
from lightning_ood.statistics import FeatureStatistics
from tests.test_cli import run_cli
from tests.test_published import bn, densenet3_forward, densenet3_state, openood_resnet18_state

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

    with pytest.raises(ConfigError, match="use \\{scorer: bats, statistics: empirical\\}"):
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


def test_normratio_jigsaw_is_made_in_pixel_space_with_a_black_strip():
    class Recorder(Backbone):
        def __init__(self):
            super().__init__()
            self.block = nn.Identity()
            self.head = nn.Linear(3, 2)
            self.inputs = []

        def blocks(self):
            return {"block": self.block}

        def features(self, x):
            self.inputs.append(x)
            return self.block(x).mean((2, 3))

    normalization = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    pixels = torch.rand(2, 3, 32, 32)
    images = normalization.normalize(pixels)
    recorder = Recorder()
    norm_ratios(recorder, [(images, torch.zeros(2), torch.tensor([0, 1]))], normalization=normalization)
    # the network sees pixels in [0, 1], not normalised, the ID images and their jigsaws alike (the authors' inputs)
    torch.testing.assert_close(recorder.inputs[0], pixels, atol=1e-6, rtol=0)
    scrambled = recorder.inputs[1]
    assert torch.allclose(scrambled[:, :, 30:, :], torch.zeros(1), atol=1e-6)  # the uncovered strip is black
    assert torch.allclose(scrambled[:, :, :, 30:], torch.zeros(1), atol=1e-6)
    for i in range(2):  # the 3x3 tiles of 10x10 pixels are a permutation of the original's
        tiles = sorted(pixels[i, :, r : r + 10, c : c + 10].sum().item() for r in (0, 10, 20) for c in (0, 10, 20))
        moved = sorted(scrambled[i, :, r : r + 10, c : c + 10].sum().item() for r in (0, 10, 20) for c in (0, 10, 20))
        np.testing.assert_allclose(moved, tiles, rtol=1e-5)


def test_reference_images_are_reused_only_for_the_same_images_and_weights(caplog):
    """A second ``trainer.test`` in the same process reuses the measured ID test images (same scores); other ID test
    images (count or content) or other weights measure them again."""
    from lightning.pytorch import Trainer

    from lightning_ood.data import SyntheticDataModule
    from lightning_ood.module import OODClassifier

    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    module = OODClassifier(backbone="resnet20", num_classes=3, scorers={"react": {"reference": "id_test"}})

    def test(test_size, seed=0):
        dm = SyntheticDataModule(num_classes=3, train_size=30, test_size=test_size, ood_sizes={"noise": 10}, seed=seed)
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          inference_mode=False)  # fmt: skip
        caplog.clear()
        trainer.test(module, datamodule=dm, verbose=False)
        measured = re.search(r"Reference 'id_test': (\d+) ID images measured", caplog.text)
        reused = re.search(r"Reference 'id_test': the (\d+) ID images measured before", caplog.text)
        return measured, reused, module.ood_report.metrics["react"]["noise"]

    first, _, metrics = test(25)
    assert first and first[1] == "25"
    again, reused, metrics_again = test(25)
    assert again is None and reused[1] == "25" and metrics_again == metrics
    other_images, _, _ = test(20)
    assert other_images and other_images[1] == "20"
    other_content, _, _ = test(20, seed=1)  # as many images, other pixels
    assert other_content and other_content[1] == "20"
    module.ood_statistics.weights = ""  # statistics of unknown weights (an older checkpoint) are kept...
    with torch.no_grad():
        next(module.backbone.parameters()).mul_(1.5)
    other_weights, _, _ = test(20)  # ...but the reference images are measured again under the new weights
    assert other_weights and other_weights[1] == "20"
