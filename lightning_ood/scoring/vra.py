"""VRA: variational rectified activation (Xu, Lian, Liu & Tao, NeurIPS 2023).

VRA rectifies each unit of the pooled penultimate feature between two thresholds: activations below ``alpha`` are set
to 0, those above ``beta`` to ``beta``, the rest are kept (VRA+ adds ``gamma`` to them); then energy. VRA++ also
subtracts ``a * sum_i (h_i - m)^2`` of the unrectified feature. As the authors (zeroQiaoba/VRA):

- where: the pooled feature, the head's input (``models/resnet.py`` lines 201-215, ``models/densenet.py`` lines
  137-141, ``case == "clip2"``);
- the rule: ``h + gamma`` compared with ``alpha + gamma`` and ``beta + gamma``, below set to 0, above to ``beta``
  (``models/resnet.py`` lines 207-209);
- the thresholds: per unit, the ``q1`` and ``q2`` quantiles of the training features (``ood_eval.py`` lines 154-160:
  ``torch.quantile(feat, q, dim=0)`` of the features that ``--case train`` stored, lines 235-238 and 257-260); on
  ImageNet absolute ``--featmin`` / ``--featmax``;
- the score: ``logsumexp`` of the logits (``util/score.py`` lines 93-109; the temperature there is commented out),
  plus ``-a * sum (h - m)^2`` for VRA++ (lines 81-91);
- the values (``readme.md``): CIFAR-10 VRA q1 0.6, q2 0.9; VRA+ q1 0.6, q2 0.95, gamma 0.6; VRA++ q1 0.5, q2 0.85,
  a 0.01, m 4. ImageNet ResNet-50 VRA 0.5 / 1; VRA+ 0.6 / 0.7, gamma 0.3; VRA++ 0.3 / 0.8, a 0.001, m 1.5.

OpenOOD (``openood/postprocessors/vra_postprocessor.py``, ``configs/postprocessors/vra.yml``) computes another VRA: one
threshold pair over all units, the 10th and 90th percentiles of its ID validation features, and activations below the
lower one clamped to it rather than zeroed (``per_unit=False, below="clamp", reference="id_val"``: the registered
``vra_openood``). pytorch-ood 0.4 clamps each element of the final feature map between its own quantiles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring.base import (
    OUTPUTS,
    LogitScorer,
    as_float,
    check_nonnegative,
    check_number,
    check_percentile,
    check_reference,
    reference_set,
)
from lightning_ood.scoring.logits import check_choice
from lightning_ood.statistics import (
    QUANTILE_GRID,
    QUANTILE_STEP,
    FeatureStatistics,
    Reducers,
    Statistic,
    StatisticsBatch,
    StatisticsSetup,
    percentile,
    quantile_stride,
)

MAX_VALUES = 64_000_000  # training activations kept for the per-unit quantiles (as the core percentiles keep)


class UnitQuantiles(Statistic):
    """``unit_quantiles``: per unit, the percentiles p = 0, 0.1, ..., 100 of the training features (1001, L), exact
    (numpy's linear interpolation) over the training images kept: every one of them unless N x L exceeds
    ``MAX_VALUES``, then one in a stride by dataset index, the same whatever the batching and the ranks."""

    name = "unit_quantiles"
    fields = ("unit_quantiles",)

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        self.stride = quantile_stride(setup.num_samples, setup.feature_dim, MAX_VALUES)
        self.kept: list[Tensor] = []

    def update(self, batch: StatisticsBatch) -> None:
        h = batch.features.detach().cpu()
        h = h if h.dtype == torch.float64 else h.float()  # the values the network produced
        self.kept.append(h[batch.indices % self.stride == 0])

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        values = torch.cat(self.kept) if self.kept else torch.empty(0, self.setup.feature_dim)
        values = reduce.gather(values)  # the order of the rows does not change a percentile
        return {"unit_quantiles": percentile(values, QUANTILE_GRID.to(values.device), dim=0).T.contiguous()}


class VRA(LogitScorer):
    """Rectify each unit to 0 below ``alpha``, ``beta`` above ``beta``, ``h + gamma`` between; then energy (or MSP),
    minus ``norm_weight * sum_i (h_i - norm_centre)^2`` of the raw feature (VRA++).

    Args:
        lower: alpha as a percentile of the reference activations, in % (60: the authors' CIFAR-10 q1); ``None``: no
            lower threshold.
        upper: beta as a percentile, in % (90: the authors' CIFAR-10 q2); ``None``: no upper threshold.
        lower_clip: an absolute alpha, in place of ``lower`` (ImageNet ResNet-50: 0.5).
        upper_clip: an absolute beta, in place of ``upper`` (ImageNet ResNet-50: 1.0).
        gamma: added to the kept activations (VRA+; 0 for VRA).
        norm_weight: a of VRA++ (0: VRA, VRA+).
        norm_centre: m of VRA++.
        per_unit: one threshold pair per unit (the authors') or one over all units (OpenOOD).
        below: activations below alpha become ``zero`` (the authors') or ``clamp`` to alpha (OpenOOD, pytorch-ood).
        reference: the images the percentiles come from: ``train`` (the authors) or ``id_val`` (OpenOOD).
        output: ``energy`` (the authors') or ``msp``.
    """

    BELOW = ("zero", "clamp")
    needs_statistics = frozenset({UnitQuantiles})

    def __init__(
        self,
        lower: float | None = 60.0,
        upper: float | None = 90.0,
        lower_clip: float | None = None,
        upper_clip: float | None = None,
        gamma: float = 0.0,
        norm_weight: float = 0.0,
        norm_centre: float = 1.0,
        per_unit: bool = True,
        below: str = "zero",
        reference: str = "train",
        output: str = "energy",
    ) -> None:
        super().__init__(output)
        check_percentile("lower", lower)
        check_percentile("upper", upper)
        for name, value in (("lower_clip", lower_clip), ("upper_clip", upper_clip), ("norm_centre", norm_centre)):
            check_number(name, value)
        check_number("gamma", gamma)
        check_nonnegative("norm_weight", norm_weight)
        if lower is not None and upper is not None and lower > upper:
            raise ConfigError(f"lower must not exceed upper, got {lower} > {upper}.")
        if lower_clip is not None and upper_clip is not None and lower_clip > upper_clip:
            raise ConfigError(f"lower_clip must not exceed upper_clip, got {lower_clip} > {upper_clip}.")
        if not isinstance(per_unit, bool):
            raise ConfigError(f"per_unit must be true or false, got {per_unit!r}.")
        self.lower, self.upper = lower, upper
        self.lower_clip, self.upper_clip = lower_clip, upper_clip
        self.gamma = gamma
        self.norm_weight, self.norm_centre = norm_weight, norm_centre
        self.per_unit = per_unit
        self.below = check_choice("below", below, self.BELOW)
        self.reference = check_reference(reference, ("train", "id_val"))
        if self.percentiles_used() == ():
            self.reference = "train"  # absolute thresholds need no reference images

    def percentiles_used(self) -> tuple[float, ...]:
        return tuple(p for p, clip in ((self.lower, self.lower_clip), (self.upper, self.upper_clip))
                     if p is not None and clip is None)  # fmt: skip

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> VRA:
        super().fit_statistics(stats, head)
        self.alpha = self.threshold(stats, self.lower, self.lower_clip, -torch.inf)  # (L,) or ()
        self.beta = self.threshold(stats, self.upper, self.upper_clip, torch.inf)
        return self

    def threshold(self, stats: FeatureStatistics, p: float | None, clip: float | None, none: float) -> Tensor:
        if clip is not None:
            return torch.tensor(float(clip), dtype=torch.float64)
        if p is None:
            return torch.tensor(none, dtype=torch.float64)
        if not self.per_unit:
            return torch.tensor(stats.activation_percentile(p, self.reference), dtype=torch.float64)
        if self.reference != "train":
            return percentile(reference_set(stats, self.reference).features, p, dim=0)  # (L,)
        index = p / QUANTILE_STEP
        if abs(index - round(index)) > 1e-6:
            raise ConfigError(f"VRA's per-unit percentiles are stored on a {QUANTILE_STEP} grid; got {p}.")
        return stats.unit_quantiles[round(index)].clone()  # (L,)

    def rectified(self, features: Tensor) -> Tensor:  # (N, L) -> (N, L)
        h = as_float(features)
        alpha, beta = self.alpha.to(h.dtype), self.beta.to(h.dtype)
        # the authors' order of operations: shift, then compare with the shifted thresholds
        shifted = h + self.gamma
        low = torch.zeros_like(h) if self.below == "zero" else alpha.expand_as(h)
        shifted = torch.where(shifted < alpha + self.gamma, low, shifted)
        return torch.where(shifted > beta + self.gamma, beta.expand_as(h), shifted)

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        return self.head_logits(self.rectified(features))

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        score = OUTPUTS[self.output](self.logits(features, logits))
        if self.norm_weight:
            score = score - self.norm_weight * (as_float(features) - self.norm_centre).square().sum(dim=1)
        return score
