"""Activation shaping: ASH (-P, -B, -S) and SCALE on the pooled feature, RankFeat on the last two stages' outputs.

ASH and SCALE shape the globally pooled feature vector, the head's input, as their authors do: andrijazz/ash applies
ASH right after the global pooling (``models/resnet_imagenet.py``, ``densenet.py``, ``mobilenetv2.py`` and its README's
usage), kai422/SCALE and OpenOOD shape the backbone's pooled feature (``openood/networks/scale_net.py``,
``ash_net.py``). ``where="map"`` (the registered ``ash_p_map``, ``ash_b_map``, ``ash_s_map``, ``scale_map``) is our
variant, as pytorch-ood does it: it shapes the final feature map before the pooling (all C x H x W values of an image,
8,192 on the CIFAR ResNet-18 where the pooled feature has 512), captured in the one forward pass (see
:class:`~lightning_ood.models.base.BatchNormTail`), then pools it and feeds the head.

RankFeat removes the rank-1 part of a stage's output and runs the rest of the network on it (see :class:`RankFeat`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.errors import ConfigError
from lightning_ood.models.base import Backbone, BatchNormTail, pool
from lightning_ood.scoring.base import OUTPUTS, Batch, Scorer, as_float, check_percentile, check_positive, energy
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


class Shaping(Scorer):
    """A change of the pooled feature (or, ``where="map"``, of the final feature map), then the head and energy (or
    MSP)."""

    WHERE = ("pooled", "map")

    def __init__(self, where: str = "pooled", output: str = "energy") -> None:
        super().__init__()
        self.where = check_choice("where", where, self.WHERE)
        self.output = check_choice("output", output, tuple(OUTPUTS))
        self.point: BatchNormTail | None = None

    def bind(self, backbone: Backbone) -> Shaping:
        if self.where == "map":
            self.point = backbone.require_last_batchnorm(
                f"{type(self).__name__} on the feature map needs a network with a final feature map, and "
                "{network} has none: use where: pooled (the authors' placement)."
            )
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return self.point.captures if self.where == "map" and self.point is not None else ()

    def shape(self, x: Tensor) -> Tensor:  # (N, n) -> (N, n)
        raise NotImplementedError

    def score(self, features: Tensor, logits: Tensor) -> Tensor:  # (N, L) pooled features -> (N,)
        if self.where == "map":
            raise NotImplementedError(f"{type(self).__name__} with where=map reads the final map: call it on a Batch.")
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


# The authors' CIFAR pruning percentiles (DenseNet-101): ASH-S 95 (andrijazz/ash config/cifar10_config.yml and
# cifar100_config.yml, ``method: ash_s@95``), ASH-P and ASH-B 90.
CIFAR_PERCENTILE = {"p": 90.0, "b": 90.0, "s": 95.0}


class ASH(Shaping):
    """Activation shaping (Djurisic et al., ICLR 2023), variant ``p`` (prune), ``b`` (binarise) or ``s`` (scale).

    Args:
        variant: ``p``, ``b`` or ``s`` (the registered ``ash_p``, ``ash_b``, ``ash_s``).
        percentile: the share of activations pruned, in %; ``None``: the authors' CIFAR setting, ASH-P and ASH-B 90,
            ASH-S 95 (ImageNet ResNet-50: 60 / 65 / 90, ``configs/scorers/openood_imagenet.yaml``).
        where: ``pooled`` (the authors: the pooled feature) or ``map`` (ours: the final feature map, ``*_map``).
    """

    search_space: ClassVar[dict[str, tuple]] = {"percentile": (65, 70, 75, 80, 85, 90, 95)}

    def __init__(
        self, variant: str = "s", percentile: float | None = None, where: str = "pooled", output: str = "energy"
    ) -> None:
        super().__init__(where, output)
        self.variant = check_choice("variant", variant, ("p", "b", "s"))
        check_percentile("percentile", percentile)
        self.percentile = CIFAR_PERCENTILE[variant] if percentile is None else percentile

    def shape(self, x: Tensor) -> Tensor:
        return ash(x, self.percentile, self.variant)


class SCALE(Shaping):
    """SCALE (Xu et al., ICLR 2024): activations scaled by ``exp(s1 / s2)`` of the top (100 - p)%, then energy.

    Args:
        percentile: p, in %: 85, the authors' default (kai422/SCALE ``configs/postprocessors/scale.yml``) and their
            ImageNet ResNet-50 choice; on CIFAR their released ResNet-18 results used 65.
        where: ``pooled`` (the authors) or ``map`` (ours: the final feature map, ``scale_map``).
    """

    search_space: ClassVar[dict[str, tuple]] = {"percentile": (65, 70, 75, 80, 85, 90, 95)}

    def __init__(self, percentile: float = 85.0, where: str = "pooled", output: str = "energy") -> None:
        super().__init__(where, output)
        check_percentile("percentile", percentile)
        self.percentile = percentile

    def shape(self, x: Tensor) -> Tensor:
        return scale(x, self.percentile)


class RankFeat(Scorer):
    """RankFeat (Song et al., NeurIPS 2022): the rank-1 component ``s1 u1 v1^T`` of each image's stage output
    (channels x positions) removed, the rest of the network run on it, and energy at ``temperature``.

    As the authors (KingJamesSong/RankFeat ``test_ood_resnetv2.py``, ``iterate_data_rankfeat``) and OpenOOD
    (``rankfeat_postprocessor.py``) do by default, it removes the rank-1 part from the output of Block-4 and, apart,
    from that of Block-3 (Block-4 then runs on the result), and averages the two paths' logits before the energy.
    Block-4 and Block-3 are the last two of the backbone's ``stages()``: on the ResNets (18, 20, 50) the outputs of
    the last two residual stages (``layer4``, ``layer3`` as in OpenOOD; ResNet-20: its third and second); on
    DenseNet-BC the final feature map ``relu(bn(.))`` and the last transition's output (the last dense block's
    input). ``fuse=False`` is their Block-4-only variant (``rankfeat_block4``).

    Args:
        temperature: T of the energy ``T logsumexp(f / T)`` (the authors' default 1).
        fuse: average the Block-3 and Block-4 paths' logits (the authors' default); ``False``: Block-4 alone.
    """

    def __init__(self, temperature: float = 1.0, fuse: bool = True) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        if not isinstance(fuse, bool):
            raise ConfigError(f"fuse must be true or false, got {fuse!r}.")
        self.temperature = temperature
        self.fuse = fuse
        self.stage_names: tuple[str, ...] = ()  # (Block-3, Block-4) or (Block-4,), after bind
        self.network: Backbone | None = None

    def bind(self, backbone: Backbone) -> RankFeat:
        stages = list(backbone.stages())
        wanted = 2 if self.fuse else 1
        if len(stages) < wanted:
            raise ConfigError(
                f"RankFeat reads the output of the network's last {wanted} stage(s) (backbone.stages()), and "
                f"{type(backbone).__name__} lists {len(stages)}."
            )
        self.network = backbone
        self.stage_names = tuple(stages[-wanted:])
        return self

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        return self.stage_names

    def forward(self, batch: Batch) -> Tensor:
        if self.network is None:
            raise ConfigError("RankFeat runs the network's last stages: call bind(backbone).")
        if batch.inputs is None:
            raise ValueError("RankFeat runs the network's last stages again: its Batch needs the inputs")
        outputs = {name: batch.blocks[name] for name in self.stage_names}  # (N, C, H, W) each, read before any rerun
        logits = []
        for name, output in outputs.items():
            removed = rank1_removed(output.flatten(2)).view_as(output)
            logits.append(self.head_logits(as_float(self.features_from(name, removed, batch.inputs))))
        return energy(torch.stack(logits).mean(dim=0), self.temperature)

    def features_from(self, name: str, output: Tensor, inputs: Tensor) -> Tensor:  # -> (N, L)
        """The network's features with stage ``name``'s output (``<module>:input``: that module's input) replaced by
        ``output``: the layers after it run on it. The layers before it run on one input image only, since the
        replacement discards what they give."""
        if name.endswith(":input"):
            module = self.network.get_submodule(name.removesuffix(":input"))
            handle = module.register_forward_pre_hook(lambda _module, _inputs: (output,))
        else:
            handle = self.network.get_submodule(name).register_forward_hook(lambda _module, _inputs, _output: output)
        try:
            return self.network.features(inputs[:1])
        finally:
            handle.remove()


def top_singular_vector(x: Tensor, tol: float = 1e-12, max_iter: int = 300) -> tuple[Tensor, bool] | None:
    """The unit top singular vector of each matrix of ``x`` (N, C, S) float64, left (N, C) if ``C <= S`` (the flag is
    ``True``), right (N, S) otherwise: power iteration on the smaller Gram matrix (``M M^T`` or ``M^T M``) until every
    vector has converged to ``tol``, far cheaper than a full SVD of every image's map. ``None`` when the top two
    singular values of some matrix are too close to converge in ``max_iter`` steps."""
    n, c, s = x.shape
    left = c <= s
    gram = x @ x.transpose(1, 2) if left else x.transpose(1, 2) @ x  # (N, k, k), k = min(C, S)
    v = torch.ones(n, gram.shape[1], 1, dtype=x.dtype, device=x.device) / gram.shape[1] ** 0.5
    for step in range(max_iter):
        w = gram @ v
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(1e-300)
        converged = step % 10 == 9 and bool(((w - v).abs().amax(dim=(1, 2)) < tol).all())
        v = w
        if converged:
            return v.squeeze(2), left
    return None


def rank1_removed(matrix: Tensor) -> Tensor:  # (N, C, S) -> (N, C, S)
    """``M - s1 u1 v1^T`` for each matrix M: ``M - u (u^T M)`` with the unit top left vector u, or ``M - (M v) v^T``
    with the right one (see :func:`top_singular_vector`); a (near-)degenerate top pair takes the exact SVD."""
    x = matrix.double()
    top = top_singular_vector(x)
    if top is None:
        u, sv, vh = torch.linalg.svd(x, full_matrices=False)
        return (x - sv[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).to(matrix.dtype)
    vector, left = top
    # u (u^T M) with the left vector, (M v) v^T with the right one
    rank1 = vector[:, :, None] * (vector[:, None, :] @ x) if left else (x @ vector[:, :, None]) * vector[:, None, :]
    return (x - rank1).to(matrix.dtype)


def rank1_removed_mean(matrix: Tensor) -> Tensor:  # (N, C, S) -> (N, C)
    """``(M - s1 u1 v1^T).mean(dim=2)``: the row means after removing the top singular component."""
    return rank1_removed(matrix).mean(dim=2)


__all__ = ["ASH", "SCALE", "RankFeat", "ash", "rank1_removed", "rank1_removed_mean", "scale"]
