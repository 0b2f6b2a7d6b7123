"""Activation shaping of the penultimate features before the head: ReAct and BATS."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.models.base import Backbone, BatchNormTail
from lightning_ood.scoring.base import (
    OUTPUTS,
    Batch,
    LogitScorer,
    Tuning,
    as_float,
    check_nonnegative,
    check_percentile,
    check_reference,
)
from lightning_ood.scoring.fmls import CLIP_SWEEP
from lightning_ood.statistics import FeatureStatistics


class ReAct(LogitScorer):
    """Rectified activations (Sun et al., NeurIPS 2021): ``h <- min(h, c)``, then energy (or MSP).

    ``c`` is the absolute ``clip`` when given, else the ``percentile``-th percentile of all activations (all units)
    of the ``reference`` images:

    - ``train`` (default): every training image the statistics are fitted on;
    - ``id_val``: held-out ID images that are never scored (the ``data.val_split`` images, else 2,000 seeded
      training images), as OpenOOD's ``react_postprocessor.py`` takes it from its ID validation list;
    - ``id_test``: 2,000 ID test images (a seeded subset) that are also scored, test-set leakage that the results
      flag, kept because it is the ReAct authors' run (deeplearning-wisc/react ``compute_threshold.py`` reads
      batches of its shuffled ``val`` loader, the CIFAR test set or the ImageNet validation set, until it has more
      than 2,000 images, and ``eval.py`` scores that same set); the DICE / LINE / HIMPLoS code passes an absolute
      ``--threshold`` instead.
    """

    # sweep: the sensitivity to the clipping threshold lambda (the paper's Figure 6, beside fmls)
    tuning: ClassVar[Tuning] = Tuning(of_activations={"clip_percentile": "clip"}, sweep={"clip_percentile": CLIP_SWEEP})

    def __init__(
        self, percentile: float = 90.0, clip: float | None = None, reference: str = "train", output: str = "energy"
    ) -> None:
        super().__init__(output)
        check_percentile("percentile", percentile)
        check_nonnegative("clip", clip)
        self.percentile = percentile
        self.clip = clip
        check_reference(reference)
        self.reference = reference if clip is None else "train"  # an absolute clip needs no reference images

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> ReAct:
        super().fit_statistics(stats, head)
        self.threshold = (
            self.clip if self.clip is not None else stats.activation_percentile(self.percentile, self.reference)
        )
        return self

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        return self.head_logits(features.clamp(max=self.threshold))


class BATS(LogitScorer):
    """Boundary-aware typical-feature shaping (Zhu et al., NeurIPS 2022): truncate features to their typical set
    ``[mu - lam * sigma, mu + lam * sigma]``, then energy.

    ``statistics`` chooses the typical set and where it is applied:

    - ``bn`` (default, the paper's definition): the output of the network's last BatchNorm follows N(beta, gamma^2)
      per channel, so it is truncated to ``beta -+ lam * |gamma|`` of that layer, before the ReLU, pooling (and, in
      ResNets, the residual addition) that follow; only that tail of the network is run again (the BatchNorm output
      is captured in the one forward pass).
    - ``bn_pooled``: the same BatchNorm bounds applied to the pooled features, as the authors' released CIFAR code
      does (alibaba/easyrobust, ``examples/ood_detection/BATS``: its mean/std files hold the last BatchNorm's bias and
      weight, and the clamp is on ``forward_features``' pooled output).
    - ``empirical``: the per-unit mean and standard deviation of the pooled training features (the authors' ViT
      code, which measures them; this project's earlier behaviour), for networks without a BatchNorm.

    ``lam = 3.25`` is the authors' CIFAR-10 ResNet-18 value; 1.05 on ImageNet.
    """

    STATISTICS = ("bn", "bn_pooled", "empirical")

    def __init__(self, lam: float = 3.25, statistics: str = "bn", output: str = "energy") -> None:
        super().__init__(output)
        check_nonnegative("lam", lam)
        if statistics not in self.STATISTICS:
            raise ConfigError(f"BATS statistics must be one of {', '.join(self.STATISTICS)}, got {statistics!r}.")
        self.lam = lam
        self.statistics = statistics
        self.point: BatchNormTail | None = None

    def bind(self, backbone: Backbone) -> BATS:
        if self.statistics != "empirical":
            self.point = backbone.require_last_batchnorm(
                f"BATS with statistics {self.statistics!r} reads the last BatchNorm before the features, and "
                "{network} has none: use {{scorer: bats, statistics: empirical}}."
            )
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        if self.statistics != "bn" or self.point is None:
            return ()
        return self.point.captures

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> BATS:
        super().fit_statistics(stats, head)
        if self.statistics == "empirical":
            centre, spread = stats.mean.to(self.weight.dtype), stats.std.to(self.weight.dtype)
        else:
            if self.point is None:
                raise ConfigError(f"BATS with statistics {self.statistics!r} needs the network: call bind(backbone).")
            bn = self.point.bn
            centre, spread = bn.bias.detach().to(self.weight.dtype), bn.weight.detach().to(self.weight.dtype).abs()
        self.lower = centre - self.lam * spread  # (L,) or (channels,)
        self.upper = centre + self.lam * spread
        return self

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        if self.statistics == "bn":
            raise TypeError("BATS on the BatchNorm output reads the block outputs: call it on a Batch")
        return self.head_logits(features.clamp(min=self.lower, max=self.upper))

    def forward(self, batch: Batch) -> Tensor:  # {BN out, ...} -> (N,)
        if self.statistics != "bn":
            return self.score(batch.features, batch.logits)
        z = as_float(batch.blocks[self.point.name])
        z = z.clamp(min=self.lower.view(1, -1, 1, 1).to(z.dtype), max=self.upper.view(1, -1, 1, 1).to(z.dtype))
        return OUTPUTS[self.output](self.head_logits(as_float(self.point.tail(z, batch.blocks))))
