"""Mahalanobis with input pre-processing on the penultimate features, as pytorch-ood 0.4 computes it
(``pytorch_ood.detector.MahalanobisODIN``, ``detector/mahalanobis.py``), after Lee et al. (NeurIPS 2018).

Not one of our other Mahalanobis scorers at any setting:

- ``mahalanobis``: the same Gaussians and distance, without the input step;
- ``mds_ensemble``: Lee et al.'s layer ensemble (``backbone.stages()``, their ``stages`` Gaussians), a step per layer;
  restricted to its last layer (the pooled final map, the penultimate features) it is this score, except where the
  input gradient is exactly 0: Lee et al.'s code (and ``mds_ensemble``) steps by ``+epsilon`` there, pytorch-ood's
  ``torch.sign`` does not move the pixel;
- ``mahalanobis_paper``: Lee et al.'s layers combined by a logistic regression fitted on FGSM images, the step not
  divided by the std.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.precision import device_constant
from lightning_ood.scoring.base import Batch, Scorer, check_nonnegative
from lightning_ood.scoring.ensemble import check_input_batch
from lightning_ood.scoring.mahalanobis import mahalanobis_terms, squared_distances
from lightning_ood.statistics import FeatureStatistics


class MahalanobisODIN(Scorer):
    """``score = -min_c d_c(h(x'))``, ``x' = x - epsilon * sign(grad_x min_c d_c(h(x))) / std``, with ``d_c`` the
    squared Mahalanobis distance of the penultimate features to class c under the tied covariance (the core
    statistics, as ``mahalanobis``) and ``sign(0) = 0``, as pytorch-ood.

    pytorch-ood's outlier score is half the closest distance under the inverse of the undivided scatter plus ``1e-6 I``
    (about ``N`` times our covariance): ours is ``-2 N`` times it, the same order (the ridge aside). Costs one
    forward and one backward pass, then one forward pass, per test image, on top of the engine's pass.

    Args:
        epsilon: the step (pytorch-ood's default ``eps``, 0.002); Lee et al. choose among 0 ... 0.01.
        scale_by_std: divide the step by the per-channel normalisation std (pytorch-ood's ``norm_std``), so that
            ``epsilon`` is in pixel units, as Lee et al. and ODIN.
    """

    needs_inputs = True
    search_space: ClassVar[dict[str, tuple]] = {"epsilon": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)}

    def __init__(self, epsilon: float = 0.002, scale_by_std: bool = True) -> None:
        super().__init__()
        check_nonnegative("epsilon", epsilon)
        self.epsilon = epsilon
        self.scale_by_std = scale_by_std

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> MahalanobisODIN:
        super().fit_statistics(stats, head)
        self.terms = mahalanobis_terms(stats.class_means, stats.covariance, stats.counts)
        return self

    def closest(self, features: Tensor) -> Tensor:  # (N, L) -> (N,) squared distance to the closest class mean
        d = squared_distances(features.double(), *self.terms)
        return d.min(dim=1).values

    def forward(self, batch: Batch) -> Tensor:
        inputs, features_fn = check_input_batch(batch, "mahalanobis_odin")
        x = inputs.detach()
        if self.epsilon:
            with torch.inference_mode(False), torch.enable_grad():
                moving = x.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.closest(features_fn(moving)).sum(), moving)
            step = torch.sign(grad)
            if self.scale_by_std:
                if batch.std is None:
                    raise ValueError("mahalanobis_odin with scale_by_std=True needs the normalisation std")
                step = step / device_constant(batch.std, step.dtype, step.device).view(1, -1, 1, 1)
            x = x - self.epsilon * step
        with torch.no_grad():
            return -self.closest(features_fn(x))
