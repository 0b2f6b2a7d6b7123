"""Gram matrices (Sastry & Oore, ICML 2020): how far an image's Gram features fall outside the range the training
images of its predicted class spanned, block by block (the statistics' ``gram``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring.base import Batch, FittedTensors, Scorer
from lightning_ood.statistics import (
    FeatureStatistics,
    LogitStatistics,
    Reducers,
    Statistic,
    StatisticsBatch,
    StatisticsSetup,
)

GRAM_CHUNK_ELEMENTS = 2**20  # float32 values per chunk of images in gram_features (4 MB)
GRAM_POWERS = 10  # Gram orders 1 ... 10, as Sastry & Oore
GRAM_HOLDOUT = 50  # one training image in 50 normalises the deviations instead of setting the bounds


class GramBounds(Statistic):
    """``gram``: per block output (``backbone.blocks()``), order p = 1 ... ``GRAM_POWERS`` and predicted class, the
    minimum and maximum of the Gram features over the training images, and each block's mean deviation on one
    training image in ``GRAM_HOLDOUT`` (left out of the bounds), which normalises it (Sastry & Oore, ICML 2020)."""

    name = "gram"
    fields = ("gram",)
    needs_logits = True

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        self.names = list(setup.backbone.blocks()) if setup.backbone is not None else []
        self.bounds: dict[str, dict] = {name: {"held": []} for name in self.names}

    def blocks(self) -> list[str]:
        return self.names

    def update(self, batch: StatisticsBatch) -> None:
        predicted = batch.logits.argmax(dim=1).cpu()
        held = batch.indices % GRAM_HOLDOUT == 0
        for name, bounds in self.bounds.items():
            g = gram_features(batch.blocks[name].detach()).cpu()  # (B, P, S)
            if "mins" not in bounds:
                shape = (self.setup.num_classes, *g.shape[1:])
                bounds["mins"] = torch.full(shape, math.inf, dtype=torch.float64)
                bounds["maxs"] = torch.full(shape, -math.inf, dtype=torch.float64)
            bounds["held"].append((predicted[held], g[held]))
            for c in predicted[~held].unique().tolist():
                members = g[~held & (predicted == c)]
                bounds["mins"][c] = torch.minimum(bounds["mins"][c], members.amin(dim=0))
                bounds["maxs"][c] = torch.maximum(bounds["maxs"][c], members.amax(dim=0))

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        gram = {}
        for name, bounds in self.bounds.items():
            mins, maxs = reduce.min(bounds["mins"]), reduce.max(bounds["maxs"])
            unseen = torch.isinf(mins)  # a class never predicted: no bounds, no deviation counted for it
            mins, maxs = mins.masked_fill(unseen, 0.0), maxs.masked_fill(unseen, 0.0)
            classes = reduce.gather(torch.cat([c for c, _ in bounds["held"]]))
            held = reduce.gather(torch.cat([g for _, g in bounds["held"]]))
            deviation = gram_deviation(held, mins, maxs, classes)
            gram[name] = {"mins": mins, "maxs": maxs, "normalizer": deviation.mean().clamp_min(1e-12)}
        return {"gram": gram}


def gram_features(block_output: Tensor, powers: int = GRAM_POWERS) -> Tensor:  # (N, C, H, W) or (N, T, D) -> (N, P, C)
    """Sastry & Oore's Gram features of one block output: for p = 1 ... ``powers``, the row sums of the Gram matrix
    of the map raised element-wise to p, ``G_p = (x^p)(x^p)^T 1``, brought back to the scale of x by the signed p-th
    root. Row sums need no C x C matrix: ``(x^p)(x^p)^T 1 = (x^p) ((x^p)^T 1)``.

    In float32, as the authors, but without their overflow (x^20 exceeds float32 for activations above ~80, which OOD
    inputs reach): each image's map is scaled to a largest absolute value of t = 2^(48 // powers) (16 for ten orders)
    first, so that no product of two powers exceeds 2^96 per term, and the root brings the scale back exactly,
    ``root_p(G_p(x)) = (m / t)^2 root_p(G_p(x t / m))``. The result agrees with float64 to about 1e-5 m^2 (m: the
    image's largest |activation|); channels far below m (under ~1e-3 m) lose their highest orders, as small
    activations do in the authors' float32. 2x faster than float64. A few images at a time, so that the ten orders'
    passes stay in the CPU cache (3x faster than the whole batch at once)."""
    per_image = block_output[0].numel() if len(block_output) else 1
    step = max(1, GRAM_CHUNK_ELEMENTS // per_image)
    return torch.cat([_gram_features(chunk, powers) for chunk in block_output.split(step)])


def _gram_features(block_output: Tensor, powers: int) -> Tensor:
    x = block_output.float()
    x = x.flatten(2) if x.ndim == 4 else x.transpose(1, 2)  # (N, C, S)
    largest = x.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scale = largest / 2.0 ** (48 // powers)
    x = x / scale
    sums = []
    a = x
    for p in range(1, powers + 1):
        a = x if p == 1 else (x * x if p == 2 else a.mul_(x))  # x^p by one product per order (pow is ~10x slower)
        sums.append((a @ a.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(2))  # (N, C)
    rows = torch.stack(sums, dim=1)  # (N, P, C)
    roots = 1.0 / torch.arange(1, powers + 1, dtype=rows.dtype, device=rows.device).view(1, powers, 1)
    return rows.sign() * rows.abs().pow(roots) * scale.view(-1, 1, 1).square()


def gram_deviation(features: Tensor, mins: Tensor, maxs: Tensor, classes: Tensor) -> Tensor:  # -> (N,)
    """How far Gram features (N, P, C) fall outside the [min, max] of each image's class (mins/maxs: (K, P, C)),
    relative to the bounds, summed over orders and channels (Sastry & Oore's deviation)."""
    low, high = mins[classes], maxs[classes]
    below = (low - features).clamp_min(0) / (low + 1e-6).abs()
    above = (features - high).clamp_min(0) / (high + 1e-6).abs()
    return (below + above).flatten(1).sum(dim=1)


class Gram(Scorer):
    """``-sum over blocks of deviation_b(x) / E[deviation_b]``: the deviation sums, over orders p = 1 ... 10 and
    channels, how far the image's Gram features lie below the minimum or above the maximum of its predicted class,
    relative to the bound; each block's is normalised by its mean on held-out training images (the authors normalise
    on validation images; OpenOOD on held-out training images, and divides the total by the MSP, which is not done
    here). The blocks are the backbone's ``blocks()`` outputs (OpenOOD hooks every convolution)."""

    needs_statistics = frozenset({GramBounds, LogitStatistics})

    def bind(self, backbone: nn.Module) -> Gram:
        self.blocks = list(backbone.blocks())
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return tuple(getattr(self, "blocks", ()))

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Gram:
        super().fit_statistics(stats, head)
        if not hasattr(self, "blocks"):
            raise ConfigError("gram reads the block outputs: call bind(backbone).")
        self.bounds = FittedTensors({name: (b["mins"], b["maxs"], b["normalizer"]) for name, b in stats.gram.items()})
        return self

    def forward(self, batch: Batch) -> Tensor:
        outputs, logits = batch.blocks, batch.logits
        classes = logits.argmax(dim=1)
        total = torch.zeros(len(logits), dtype=torch.float64, device=logits.device)
        for name in self.blocks:
            mins, maxs, normalizer = self.bounds[name]
            total += gram_deviation(gram_features(outputs[name]), mins, maxs, classes) / normalizer
        return -total
