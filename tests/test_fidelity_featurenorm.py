"""NormRatio as its authors compute it (gist-ailab/block-selection-for-OOD-detection): ``utils/dataset.py``
``get_cifar_jigsaw`` loads the ID training images and their jigsaws with ``Resize + ToTensor`` only, no
``Normalize``, and ``normratio.py`` ``calculate_layer`` feeds both to the network as they are, over the whole training
set, averaging per-image ratios of ``torch.norm(F.relu(block), dim=[2, 3]).mean(1)``.

The reference below is numpy, written from their code, on a small network whose blocks are 1x1 convolutions (so that
numpy computes them exactly) and a horizontal difference (so that moving tiles matters). Only the jigsaw permutations
are taken from ours (theirs are unseeded).
"""

import inspect
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.data.base import IndexedDataset, seeded_subset
from lightning_ood.engine import FitContext
from lightning_ood.models.base import Backbone
from lightning_ood.normalization import NORMALIZATION
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.featurenorm import FeatureNorm, norm_ratios

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
