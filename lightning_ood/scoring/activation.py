"""Shaping of the final feature map before pooling: ASH (-P, -B, -S), SCALE and RankFeat.

Their authors apply them to the last feature map before global average pooling (``where="map"``, the default): the
map is captured in the one forward pass (see :class:`~lightning_ood.models.base.BatchNormTail`), reshaped, pooled and
fed to the head here. ``where="pooled"`` applies ASH and SCALE to the pooled feature instead, as OpenOOD does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.errors import ConfigError
from lightning_ood.models.base import Backbone, BatchNormTail, pool
from lightning_ood.scoring.base import OUTPUTS, Batch, Scorer, as_float, check_percentile, check_positive
from lightning_ood.scoring.logits import check_choice


def top_kept(x: Tensor, percentile: float) -> tuple[Tensor, Tensor, int]:  # (N, n) -> values, indices (N, k), k
    """The ``k = n - round(n * p / 100)`` largest values of each row (at least one), as the ASH code keeps them."""
    n = x.shape[1]
    k = max(1, n - round(n * percentile / 100.0))
    values, indices = x.topk(k, dim=1, sorted=False)  # unsorted: the same kept set, 1.3-2.5x faster on CPU
    return values, indices, k


def ash(x: Tensor, percentile: float, variant: str) -> Tensor:  # (N, n) -> (N, n)
    """ASH (Djurisic et al., ICLR 2023) on flattened activations: prune all but the top ``k``; ``p`` keeps them,
    ``b`` sets each to ``s1 / k`` (``s1``: the sum before pruning), ``s`` multiplies them by ``exp(s1 / s2)``
    (``s2``: the sum after pruning)."""
    values, indices, k = top_kept(x, percentile)
    s1 = x.sum(dim=1, keepdim=True)
    if variant == "b":
        values = (s1 / k).expand_as(values)
    elif variant == "s":
        values = values * torch.exp(s1 / values.sum(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.zeros_like(x).scatter(1, indices, values)


def scale(x: Tensor, percentile: float) -> Tensor:  # (N, n) -> (N, n)
    """SCALE (Xu et al., ICLR 2024): every activation multiplied by ``exp(s1 / s2)``, nothing pruned (``s1``: the sum
    of all activations, ``s2``: of the top ``k``)."""
    values, _, _ = top_kept(x, percentile)
    return x * torch.exp(x.sum(dim=1, keepdim=True) / values.sum(dim=1, keepdim=True).clamp_min(1e-12))


class MapShaping(Scorer):
    """A change of the final feature map (or of the pooled feature), then the head and energy (or MSP)."""

    WHERE = ("map", "pooled")

    def __init__(self, where: str = "map", output: str = "energy") -> None:
        super().__init__()
        self.where = check_choice("where", where, self.WHERE)
        self.output = check_choice("output", output, tuple(OUTPUTS))
        self.point: BatchNormTail | None = None

    def bind(self, backbone: Backbone) -> MapShaping:
        if self.where == "map":
            self.point = backbone.last_batchnorm()
            if self.point is None:
                raise ConfigError(
                    f"{type(self).__name__} on the feature map needs a network with a final feature map, and "
                    f"{type(backbone).__name__} has none: use where: pooled."
                )
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return self.point.captures if self.where == "map" and self.point is not None else ()

    def shape(self, x: Tensor) -> Tensor:  # (N, n) -> (N, n)
        raise NotImplementedError

    def score(self, features: Tensor, logits: Tensor) -> Tensor:  # where="pooled"
        return OUTPUTS[self.output](self.head_logits(self.shape(as_float(features))))

    def forward(self, batch: Batch) -> Tensor:
        if self.where == "pooled":
            return self.score(batch.features, batch.logits)
        feature_map = as_float(self.final_map(batch))  # (N, C, H, W)
        shaped = self.shape(feature_map.flatten(1)).view_as(feature_map)
        return OUTPUTS[self.output](self.head_logits(pool(shaped)))

    def final_map(self, batch: Batch) -> Tensor:
        if self.point is None:
            raise ConfigError(f"{type(self).__name__} on the feature map needs the network: call bind(backbone).")
        return self.point.feature_map(batch.blocks)


class ASH(MapShaping):
    """Activation shaping (Djurisic et al., ICLR 2023), variant ``p`` (prune), ``b`` (binarise) or ``s`` (scale).

    Args:
        variant: ``p``, ``b`` or ``s`` (the registered ``ash_p``, ``ash_b``, ``ash_s``).
        percentile: the share of activations pruned, in % (the authors: 90 on CIFAR; ImageNet ResNet-50: ASH-P 60,
            ASH-B 65, ASH-S 90).
        where: ``map`` (the authors: the final feature map) or ``pooled`` (OpenOOD).
    """

    search_space: ClassVar[dict[str, tuple]] = {"percentile": (65, 70, 75, 80, 85, 90, 95)}

    def __init__(self, variant: str = "s", percentile: float = 90.0, where: str = "map", output: str = "energy"):
        super().__init__(where, output)
        self.variant = check_choice("variant", variant, ("p", "b", "s"))
        check_percentile("percentile", percentile)
        self.percentile = percentile

    def shape(self, x: Tensor) -> Tensor:
        return ash(x, self.percentile, self.variant)


class SCALE(MapShaping):
    """SCALE (Xu et al., ICLR 2024): activations scaled by ``exp(s1 / s2)`` of the top (100 - p)%, then energy.

    Args:
        percentile: p, in % (85, the authors' and OpenOOD's default).
        where: ``map`` (the authors) or ``pooled`` (OpenOOD).
    """

    search_space: ClassVar[dict[str, tuple]] = {"percentile": (65, 70, 75, 80, 85, 90, 95)}

    def __init__(self, percentile: float = 85.0, where: str = "map", output: str = "energy") -> None:
        super().__init__(where, output)
        check_percentile("percentile", percentile)
        self.percentile = percentile

    def shape(self, x: Tensor) -> Tensor:
        return scale(x, self.percentile)


class RankFeat(MapShaping):
    """RankFeat (Song et al., NeurIPS 2022): the rank-1 component ``s1 u1 v1^T`` of each image's final feature map
    (channels x positions) removed, then pooling, the head and energy at ``temperature``.

    This is the authors' Block-4 variant, on the last feature map captured in the one forward pass; their Block-3
    variant (and the average of both) would run the last stage a second time and is not offered.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__("map", "energy")
        check_positive("temperature", temperature)
        self.temperature = temperature

    def forward(self, batch: Batch) -> Tensor:
        feature_map = as_float(self.final_map(batch))  # (N, C, H, W)
        pooled = rank1_removed_mean(feature_map.flatten(2))  # (N, C)
        logits = self.head_logits(pooled.to(feature_map.dtype))
        return self.temperature * torch.logsumexp(logits / self.temperature, dim=1)


def rank1_removed_mean(matrix: Tensor, tol: float = 1e-12, max_iter: int = 300) -> Tensor:  # (N, C, S) -> (N, C)
    """``(M - s1 u1 v1^T).mean(dim=2)`` for each matrix M, the row means after removing its top singular component.

    Only the top singular pair matters, so it comes from power iteration on the smaller Gram matrix (``M M^T`` or
    ``M^T M``, float64) until every vector has converged to ``tol``, far cheaper than a full SVD of every image's map;
    matrices whose top two singular values are too close to converge in ``max_iter`` steps take the SVD. With the
    unit top left vector u, the mean of the rank-1 part is ``u (u . m)`` (m: the row means); with the right vector v,
    ``(M v) mean(v)``.
    """
    x = matrix.double()
    n, c, s = x.shape
    means = x.mean(dim=2)
    left = c <= s
    gram = x @ x.transpose(1, 2) if left else x.transpose(1, 2) @ x  # (N, k, k), k = min(C, S)
    v = torch.ones(n, gram.shape[1], 1, dtype=x.dtype, device=x.device) / gram.shape[1] ** 0.5
    for step in range(max_iter):
        w = gram @ v
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-300)
        converged = step % 10 == 9 and bool(((w - v).abs().amax(dim=(1, 2)) < tol).all())
        v = w
        if converged:
            break
    else:  # a (near-)degenerate top singular value: the exact decomposition
        u, sv, vh = torch.linalg.svd(x, full_matrices=False)
        return (means - (sv[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).mean(dim=2)).to(matrix.dtype)
    v = v.squeeze(2)
    if left:
        rank1 = v * (v * means).sum(dim=1, keepdim=True)
    else:
        rank1 = (x @ v[:, :, None]).squeeze(2) * v.mean(dim=1, keepdim=True)
    return (means - rank1).to(matrix.dtype)


__all__ = ["ASH", "SCALE", "RankFeat", "ash", "rank1_removed_mean", "scale"]
