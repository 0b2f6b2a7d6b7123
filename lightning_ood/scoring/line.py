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

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.scoring.base import LogitScorer, Tuning, check_nonnegative, check_percentile
from lightning_ood.scoring.fmls import CLIP_SWEEP, prototype_cosine
from lightning_ood.statistics import FeatureStatistics, percentile


class LINE(LogitScorer):
    """LINe with weight masking ``weight_percentile``, activation masking ``activation_percentile`` and clipping
    ``clip`` (authors' CIFAR-10 DenseNet: 90 / 90 / 1.0; CIFAR-100: 90 / 10 / 1.0; ImageNet ResNet-50: 10 / 10 / 0.8).

    ``smooth=True`` multiplies the logits by the paper's prototype cosine (c from the original logits): LINE + LS.
    """

    # sweep: the sensitivity to the clipping threshold lambda (the paper's Figure 6, beside fmls)
    tuning: ClassVar[Tuning] = Tuning(of_activations={"clip_percentile": "clip"}, sweep={"clip_percentile": CLIP_SWEEP})

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
        # One weight-mask threshold per predicted class c; the masked weights (C, C, L) are kept when they are small
        # (CIFAR: 100 x 100 x 512 floats, 20 MB), else built per class and batch (ImageNet's would take 8 GB).
        self.importance = contrib.abs()  # (C, L)
        self.weight_thresholds = torch.stack(
            [percentile(self.importance[c][None, :] * self.weight, self.weight_percentile) for c in range(len(contrib))]
        )  # (C,)
        classes, units = self.weight.shape
        self.masked_weights = None  # a second fit must not read the heads of the first
        self.masked_weights = (
            torch.stack([self.masked_weight(c) for c in range(classes)]) if classes * classes * units <= 2**24 else None
        )
        return self

    def masked_weight(self, c: int) -> Tensor:  # (C, L): the head with the weight mask of predicted class c
        if self.masked_weights is not None:
            return self.masked_weights[c]
        return self.weight * (self.importance[c][None, :] * self.weight > self.weight_thresholds[c])

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        h = features.clamp(max=self.clip) if self.clip is not None else features.clone()
        classes = self.head_logits(h).argmax(dim=1)  # LINE predicts from the clipped features
        h.mul_(self.activation_mask.index_select(0, classes))  # (N, L)
        # Samples grouped by predicted class: one product with that class's masked head per group.
        order = classes.argsort()
        grouped, out = h[order], torch.empty(len(h), self.weight.shape[0], dtype=h.dtype, device=h.device)
        start = 0
        for c, count in enumerate(torch.bincount(classes, minlength=self.weight.shape[0]).tolist()):
            if count:
                rows = slice(start, start + count)
                out[order[rows]] = torch.addmm(self.bias, grouped[rows], self.masked_weight(c).T)
                start += count
        if self.smooth:
            out.mul_(prototype_cosine(features, self.prototypes, logits.argmax(dim=1))[:, None])
        return out
