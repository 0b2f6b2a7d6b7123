"""FeatureNorm, jigsaw and NormRatio block selection (Yu et al., CVPR 2023; lightning_ood/scoring/featurenorm.py),
and NormRatio as its authors compute it (gist-ailab/block-selection-for-OOD-detection): ``utils/dataset.py``
``get_cifar_jigsaw`` loads the ID training images and their jigsaws with ``Resize + ToTensor`` only, no
``Normalize``, and ``normratio.py`` ``calculate_layer`` feeds both to the network as they are, over the whole
training set, averaging per-image ratios of ``torch.norm(F.relu(block), dim=[2, 3]).mean(1)``.

The reference is numpy, written from their code, on a small network whose blocks are 1x1 convolutions (so that
numpy computes them exactly) and a horizontal difference (so that moving tiles matters). Only the jigsaw
permutations are taken from ours (theirs are unseeded)."""

from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.data.base import IndexedDataset, seeded_subset
from lightning_ood.engine import FitContext
from lightning_ood.models.base import Backbone
from lightning_ood.normalization import NORMALIZATION, Normalization
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.featurenorm import FeatureNorm, feature_norm, jigsaw, norm_ratios

NORMALIZATION_CIFAR10 = NORMALIZATION["cifar10"]


class Difference(nn.Module):
    def forward(self, x):  # (N, C, H, W) -> (N, C, H, W - 1)
        return x[..., 1:] - x[..., :-1]


class Pointwise(Backbone):
    """Two blocks: a 1x1 convolution 3 -> 4 with bias; then ReLU, the horizontal difference and a 1x1 convolution
    4 -> 5."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.first = nn.Conv2d(3, 4, 1)
        self.second = nn.Sequential(nn.ReLU(), Difference(), nn.Conv2d(4, 5, 1))
        with torch.no_grad():
            for conv in (self.first, self.second[2]):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
        self.feature_dim = 5
        self.head = nn.Linear(5, 2)

    def blocks(self):
        return {"first": self.first, "second": self.second}

    def features(self, x):
        return self.second(self.first(x)).mean(dim=(2, 3))


def numpy_blocks(net: Pointwise, x: np.ndarray) -> list[np.ndarray]:  # (N, 3, H, W) -> the two block outputs
    w1, b1 = net.first.weight.detach().double().numpy()[:, :, 0, 0], net.first.bias.detach().double().numpy()
    w2, b2 = net.second[2].weight.detach().double().numpy()[:, :, 0, 0], net.second[2].bias.detach().double().numpy()
    first = np.einsum("oc,nchw->nohw", w1, x) + b1[None, :, None, None]
    activated = np.maximum(first, 0)
    difference = activated[..., 1:] - activated[..., :-1]
    second = np.einsum("oc,nchw->nohw", w2, difference) + b2[None, :, None, None]
    return [first, second]


def authors_jigsaw(x: np.ndarray, tiles_order: list[int]) -> np.ndarray:
    """``jigsaw_dataset.__getitem__``: square tiles of side int(H / 3); position o takes tile ``tiles_order[o]``."""
    s = int(float(x.shape[1]) / 3)
    out = np.zeros_like(x)
    for o, tile in enumerate(tiles_order):
        i, j, ti, tj = o // 3, o % 3, tile // 3, tile % 3
        out[:, i * s : (i + 1) * s, j * s : (j + 1) * s] = x[:, ti * s : (ti + 1) * s, tj * s : (tj + 1) * s]
    return out


def authors_norm_ratios(net: Pointwise, pixels: np.ndarray, orders: list[list[int]]) -> list[float]:
    """``calculate_layer``: the ID images and their jigsaws, both in [0, 1], through the network; per block the mean
    over images of FeatureNorm(image) / FeatureNorm(jigsaw)."""
    jigsaws = np.stack([authors_jigsaw(x, order) for x, order in zip(pixels, orders, strict=True)])
    x = np.concatenate([pixels, jigsaws])
    ratios = []
    for block in numpy_blocks(net, x):
        norm = np.sqrt((np.maximum(block, 0) ** 2).sum(axis=(2, 3))).mean(axis=1)
        ratios.append(float((norm[: len(pixels)] / norm[len(pixels) :]).mean()))
    return ratios


def our_orders(indices, seed: int = 0) -> list[list[int]]:
    """The permutations our jigsaw draws (seeded by the image's index; the authors' are unseeded)."""
    return [torch.randperm(9, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)).tolist() for i in indices]


def test_normratio_feeds_the_network_unnormalised_pixels_as_the_authors():
    pixels = torch.rand(10, 3, 14, 14, generator=torch.Generator().manual_seed(0)).double()
    images = NORMALIZATION_CIFAR10.normalize(pixels).float()  # what the data pipeline delivers
    loader = [
        (images[i : i + 4], torch.zeros(len(images[i : i + 4])), torch.arange(i, min(i + 4, 10))) for i in (0, 4, 8)
    ]
    net = Pointwise().eval()
    ours = norm_ratios(net, loader, normalization=NORMALIZATION_CIFAR10)
    reference = authors_norm_ratios(net, pixels.numpy(), our_orders(range(10)))
    np.testing.assert_allclose([ours.ratios["first"], ours.ratios["second"]], reference, rtol=1e-5)
    # the normalised inputs (the old behaviour) give other ratios: the difference is not lost in the tolerance
    normalised = authors_norm_ratios(net, images.double().numpy(), our_orders(range(10)))
    assert not np.allclose(normalised, reference, rtol=1e-3)


def dataset(count: int, size: int = 6) -> TensorDataset:
    pixels = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1))
    return TensorDataset(NORMALIZATION_CIFAR10.normalize(pixels), torch.zeros(count, dtype=torch.long))


def test_featurenorm_selects_on_every_training_image_by_default(caplog):
    """The authors use the whole training set; a count takes a seeded subset of that many (here the default was
    2,000 images)."""
    data = dataset(2100)

    def training_images(count, seed):
        return DataLoader(IndexedDataset(seeded_subset(data, count, seed)), batch_size=512)

    caplog.set_level(logging.INFO)
    logs = []
    context = FitContext(Pointwise(), training_images, NORMALIZATION_CIFAR10, log=logs.append)
    build_scorer("featurenorm").prepare(context)
    assert logs[0].startswith("NormRatio on 2100 ID training images")
    build_scorer("featurenorm", normratio_images=30).prepare(context)  # another count: measured again
    assert len(logs) == 2 and logs[1].startswith("NormRatio on 30 ID training images")
    for wrong in (0, -5, 2.5, True):
        with pytest.raises(Exception, match="normratio_images must be a count"):
            build_scorer("featurenorm", normratio_images=wrong)
    # every training image unless told otherwise, in the test pass and in `tune --scorer featurenorm` alike
    assert inspect.signature(FeatureNorm).parameters["normratio_images"].default is None
    assert FeatureNorm.tuning.prepared == ("block",)  # tune runs this very selection (prepare)


def test_the_selection_on_all_images_matches_the_authors_ratios():
    data = dataset(40, size=14)
    net = Pointwise().eval()

    def training_images(count, seed):
        return DataLoader(IndexedDataset(seeded_subset(data, count, seed)), batch_size=16)

    result = norm_ratios(net, training_images(None, 0), normalization=NORMALIZATION_CIFAR10)
    pixels = NORMALIZATION_CIFAR10.unnormalize(data.tensors[0].double()).numpy()
    reference = authors_norm_ratios(net, pixels, our_orders(range(40)))
    assert result.images == 40
    np.testing.assert_allclose([result.ratios["first"], result.ratios["second"]], reference, rtol=1e-5)
    assert result.selected == ["first", "second"][int(np.argmax(reference))]


def test_feature_norm_by_hand():
    # channel 0: ReLU -> [1, 0, 2, 0], norm sqrt(5); channel 1: [3, 4, 0, 0], norm 5 -> mean (sqrt(5) + 5) / 2
    x = torch.tensor([[[[1.0, -2.0], [2.0, 0.0]], [[3.0, 4.0], [0.0, -1.0]]]])
    assert feature_norm(x).item() == pytest.approx((math.sqrt(5) + 5) / 2)
    # a second image scaled by 2 has twice the norm; tokens (N, T, D) use T as the spatial axis
    assert feature_norm(torch.cat([x, 2 * x])).tolist() == pytest.approx([(math.sqrt(5) + 5) / 2, math.sqrt(5) + 5])
    tokens = torch.tensor([[[3.0, -1.0], [4.0, 2.0]]])  # (1, T=2, D=2): D0 -> [3, 4] norm 5, D1 -> [0, 2] norm 2
    assert feature_norm(tokens).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="FeatureNorm needs"):
        feature_norm(torch.ones(2, 3))


def tiles(image: torch.Tensor, grid: int = 3) -> list[torch.Tensor]:
    _, h, w = image.shape
    th, tw = h // grid, w // grid
    return [image[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r in range(grid) for c in range(grid)]


def test_jigsaw_tiles_are_a_permutation_of_the_original_tiles():
    images = torch.randn(4, 3, 32, 32)
    shuffled = jigsaw(images, [torch.Generator().manual_seed(i) for i in range(4)])
    orders = []
    for original, scrambled in zip(images, shuffled, strict=True):
        before, after = tiles(original), tiles(scrambled)
        used = [next(j for j, t in enumerate(before) if torch.equal(t, a)) for a in after]
        assert sorted(used) == list(range(9)), "every tile appears exactly once"
        assert (scrambled[:, 30:, :] == 0).all() and (scrambled[:, :, 30:] == 0).all()  # 10-pixel tiles: 2 px border
        orders.append(used)
    assert any(order != list(range(9)) for order in orders), "the tiles are actually moved"
    again = jigsaw(images, [torch.Generator().manual_seed(i) for i in range(4)])
    assert torch.equal(shuffled, again), "seeded"


class Designed(Backbone):
    """Three blocks with known NormRatios on ramp images x[..., j] = j / 31:
    - ``copy``: ReLU(x): the jigsaw loses the 2-pixel border, so the ratio is a bit above 1;
    - ``aligned``: ReLU(x * ramp): largest when the ramp lines up with itself (rearrangement inequality), so
      shuffling lowers its norm most: the designed choice;
    - ``flipped``: ReLU(x * (1 - ramp)): anti-aligned, shuffling raises its norm: ratio below 1."""

    def __init__(self) -> None:
        super().__init__()
        ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)
        self.register_buffer("ramp", ramp)
        self.copy, self.aligned, self.flipped = nn.Identity(), nn.Identity(), nn.Identity()
        self.feature_dim = 3
        self.head = nn.Linear(3, 2)

    def blocks(self):
        return {"copy": self.copy, "aligned": self.aligned, "flipped": self.flipped}

    def features(self, x):
        a = self.copy(x.relu())
        b = self.aligned((x * self.ramp).relu())
        c = self.flipped((x * (1 - self.ramp)).relu())
        return (a + b + c).mean(dim=(2, 3))


def test_normratio_picks_the_designed_block():
    images = torch.linspace(0, 1, 32).expand(40, 3, 32, 32).clone()
    loader = [(images[i : i + 8], torch.zeros(8), torch.arange(i, i + 8)) for i in range(0, 40, 8)]
    result = norm_ratios(Designed(), loader)
    assert result.images == 40
    assert result.selected == "aligned"
    assert result.ratios["aligned"] > result.ratios["copy"] > 1.0 > result.ratios["flipped"]
    assert result.to_csv().splitlines()[0] == "block,norm_ratio,selected"
    assert "aligned," in result.to_csv() and result.to_csv().count(",1\n") == 1
    # batching does not change the result: per-image jigsaws are seeded by dataset index
    single = norm_ratios(Designed(), [(images, torch.zeros(40), torch.arange(40))])
    assert single.ratios == pytest.approx(result.ratios, rel=1e-12)


def test_featurenorm_scorer():
    scorer = build_scorer("featurenorm", block="layer4.0")
    assert scorer.needs.blocks == ("layer4.0",)
    outputs = {"layer4.0": torch.tensor([[[[1.0, -2.0], [2.0, 0.0]], [[3.0, 4.0], [0.0, -1.0]]]])}
    assert scorer(Batch(torch.ones(1, 3), torch.ones(1, 2), outputs)).item() == pytest.approx((math.sqrt(5) + 5) / 2)
    with pytest.raises(NotImplementedError, match="Batch"):
        scorer.score(torch.ones(1, 3), torch.ones(1, 2))


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
