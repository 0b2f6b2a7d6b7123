"""LINe: leveraging important neurons (Ahn et al., CVPR 2023), with the optional logit smoothing of the paper
(Table IV, "LINE + Ours").

Contribution of unit l to class c (first-order Taylor approximation of its Shapley value), averaged over the training
images of class c: ``contrib[c, l] = mean_{i: y_i = c} h_i[l] * W[c, l] = v_c[l] * W[c, l]`` for a linear head.
At test time, with ``h' = min(h, lambda)`` and ``c = argmax(W h' + b)``:

- activation mask ``a_c = contrib[c] > percentile(contrib[c], p_a)`` (per class, strict);
- weight mask ``M_c = |contrib[c]|[None, :] * W > percentile(|contrib[c]|[None, :] * W, p_w)`` (one threshold per
  class c over all C x L entries, strict);
- ``logits = (W * M_c) (h' * a_c) + b``; score = energy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ood.scoring.base import LogitScorer, check_nonnegative, check_percentile
from lightning_ood.scoring.fmls import prototype_cosine
from lightning_ood.statistics import FeatureStatistics, percentile


class LINE(LogitScorer):
    """LINe with weight masking ``weight_percentile``, activation masking ``activation_percentile`` and clipping
    ``clip`` (authors' CIFAR-10 DenseNet: 90 / 90 / 1.0; CIFAR-100: 90 / 10 / 1.0; ImageNet ResNet-50: 10 / 10 / 0.8).

    ``smooth=True`` multiplies the logits by the paper's prototype cosine (c from the original logits): LINE + LS.
    """

    def __init__(
        self,
        weight_percentile: float = 90.0,
        activation_percentile: float = 90.0,
        clip: float | None = 1.0,
        smooth: bool = False,
        output: str = "energy",
    ) -> None:
        super().__init__(output)
        check_percentile("weight_percentile", weight_percentile)
        check_percentile("activation_percentile", activation_percentile)
        check_nonnegative("clip", clip)
        self.weight_percentile = weight_percentile
        self.activation_percentile = activation_percentile
        self.clip = clip
        self.smooth = smooth

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> LINE:
        super().fit_statistics(stats, head)
        self.prototypes = stats.class_means.to(self.weight.dtype)  # (C, L)
        contrib = self.prototypes * self.weight  # (C, L)
        self.activation_mask = (contrib > percentile(contrib, self.activation_percentile, dim=1)[:, None]).to(
            self.weight.dtype
        )
        # One weight-mask threshold per predicted class c; the (C, C, L) masks themselves are built per batch.
        self.importance = contrib.abs()  # (C, L)
        self.weight_thresholds = torch.stack(
            [percentile(self.importance[c][None, :] * self.weight, self.weight_percentile) for c in range(len(contrib))]
        )  # (C,)
        return self

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        h = features.clamp(max=self.clip) if self.clip is not None else features
        classes = self.head_logits(h).argmax(dim=1)  # LINE predicts from the clipped features
        h = h * self.activation_mask[classes]  # (N, L)
        out = torch.empty(len(h), self.weight.shape[0], dtype=h.dtype, device=h.device)
        for c in classes.unique():
            rows = classes == c
            kept = self.importance[c][None, :] * self.weight > self.weight_thresholds[c]  # (C, L)
            out[rows] = h[rows] @ (self.weight * kept).T + self.bias
        if self.smooth:
            out = out * prototype_cosine(features, self.prototypes, logits.argmax(dim=1))[:, None]
        return out
