"""Gram matrices (Sastry & Oore, ICML 2020): how far an image's Gram features fall outside the range the training
images of its predicted class spanned, block by block (the statistics' ``gram``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring.base import Batch, FittedTensors, Scorer
from lightning_ood.statistics import FeatureStatistics, gram_deviation, gram_features


class Gram(Scorer):
    """``-sum over blocks of deviation_b(x) / E[deviation_b]``: the deviation sums, over orders p = 1 ... 10 and
    channels, how far the image's Gram features lie below the minimum or above the maximum of its predicted class,
    relative to the bound; each block's is normalised by its mean on held-out training images (the authors normalise
    on validation images; OpenOOD on held-out training images, and divides the total by the MSP, which is not done
    here). The blocks are the backbone's ``blocks()`` outputs (OpenOOD hooks every convolution)."""

    needs_statistics = frozenset({"gram", "logits"})

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
        return (-total).to(logits.dtype)
