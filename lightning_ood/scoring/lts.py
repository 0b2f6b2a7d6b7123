"""LTS: logit scaling (Djurisic, Liu & Nikolic, 2024, "Logit Scaling for Out-of-Distribution Detection").

The logits are multiplied by a per-image factor read from the pooled feature, ``S = (s1 / s2)^2``, with ``s1`` the sum
of the rectified activations and ``s2`` the sum of their top ``k = n - round(n * p / 100)``; then energy. As the
authors (andrijazz/lts ``lts.py`` lines 61-72: the factor; ``ood_eval.py``: ``get_score(logits * s, ...)``, energy),
on the globally pooled feature after the pooling (``models/resnet_imagenet.py`` lines 243-253, ``densenet.py`` lines
128-139), with p = 95 on every benchmark (``config/cifar10_config.yml``, ``cifar100_config.yml``,
``resnet50_config.yml``, ...: ``lts@95``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.scoring.activation import top_kept
from lightning_ood.scoring.base import LogitScorer, as_float, check_percentile


def logit_scale(features: Tensor, percentile: float) -> Tensor:  # (N, L) -> (N, 1)
    """``(s1 / s2)^2`` of the rectified features: the mass of all activations over that of the top (100 - p)%.

    An image whose activations are all zero (``s1 = s2 = 0``, where the authors' code divides 0 by 0) gets 1: no mass
    lies outside the top ``k``, and its logits are the head's bias, unscaled.
    """
    x = features.relu()
    top, _, _ = top_kept(x, percentile)
    s1, s2 = x.sum(dim=1, keepdim=True), top.sum(dim=1, keepdim=True)
    return torch.where(s2 > 0, s1 / s2.clamp_min(torch.finfo(s2.dtype).tiny), 1.0) ** 2


class LTS(LogitScorer):
    """Logit scaling: ``energy(S(h) * f(h))`` with ``S(h) = (sum relu(h) / sum of its top (100 - p)%)^2``.

    Args:
        percentile: p, the share of activations left out of ``s2``, in % (95: the authors' value on CIFAR and
            ImageNet).
        output: ``energy`` (the authors') or ``msp``.
    """

    def __init__(self, percentile: float = 95.0, output: str = "energy") -> None:
        super().__init__(output)
        check_percentile("percentile", percentile)
        self.percentile = percentile

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:
        return as_float(logits) * logit_scale(as_float(features), self.percentile)
