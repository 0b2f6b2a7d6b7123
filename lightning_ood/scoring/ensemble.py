"""Mahalanobis with input pre-processing and a layer ensemble (Lee et al., NeurIPS 2018), the variant the paper's code
reports as "Mahalanobis" (OpenOOD's ``mds_ensemble``).

For every stage output of the backbone (``backbone.stages()``: the residual stages of a ResNet, the dense blocks of a
DenseNet), the channel means of the map get class means and a shared covariance from the training images (the
statistics' ``stages``). At test time, per stage, the input moves by ``epsilon`` against the gradient of its
distance to the closest class mean (divided by the normalisation std, as ODIN), and the stage's confidence is minus
the closest squared distance of the moved input; the score is their weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.hooks import block_outputs
from lightning_ood.scoring.base import Batch, FittedTensors, Scorer, check_nonnegative
from lightning_ood.scoring.mahalanobis import mahalanobis_terms, squared_distances
from lightning_ood.statistics import (
    FeatureStatistics,
    Reducers,
    Statistic,
    StatisticsBatch,
    StatisticsSetup,
    statistic,
)


class MahalanobisEnsemble(Scorer):
    """Args:
    epsilon: the input perturbation (0.0014, OpenOOD; Lee et al. choose among 0 ... 0.2 on validation data).
    weights: one weight per stage; ``None`` weighs them equally. (Lee et al. fit the weights by logistic regression
        on validation OOD data, which a post-hoc benchmark without OOD validation data cannot; equal weights are the
        usual substitute.)
    scale_by_std: divide the gradient sign by the per-channel normalisation std (pixel-space steps, as ODIN).
    """

    needs_inputs = True
    needs_statistics = frozenset({"stages"})
    search_space: ClassVar[dict[str, tuple]] = {"epsilon": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)}

    def __init__(self, epsilon: float = 0.0014, weights: Sequence[float] | None = None, scale_by_std: bool = True):
        super().__init__()
        check_nonnegative("epsilon", epsilon)
        self.epsilon = epsilon
        self.weights = tuple(weights) if weights is not None else None
        self.scale_by_std = scale_by_std
        self.backbone: nn.Module | None = None

    def bind(self, backbone: nn.Module) -> MahalanobisEnsemble:
        self.stage_names = list(backbone.stages())
        if not self.stage_names:
            raise ConfigError(f"mds_ensemble reads the stage outputs, and {type(backbone).__name__} lists none.")
        if self.weights is not None and len(self.weights) != len(self.stage_names):
            raise ConfigError(f"mds_ensemble: {len(self.weights)} weights for {len(self.stage_names)} stages.")
        self.backbone = backbone
        return self

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> MahalanobisEnsemble:
        super().fit_statistics(stats, head)
        if self.backbone is None:
            raise ConfigError("mds_ensemble needs the network: call bind(backbone).")
        self.terms = FittedTensors(
            {name: mahalanobis_terms(s["class_means"], s["covariance"]) for name, s in stats.stages.items()}
        )
        return self

    def closest(self, name: str, inputs: Tensor, features_fn: Callable[[Tensor], Tensor]) -> Tensor:
        """(N,) smallest squared distance of the stage's channel means to a class mean."""
        with block_outputs(self.backbone, [name]) as captured:
            features_fn(inputs)
        stage = captured[name]
        pooled = stage.flatten(2).mean(dim=2) if stage.ndim == 4 else stage.mean(dim=1)
        return squared_distances(pooled.double(), *self.terms[name]).min(dim=1).values

    def forward(self, batch: Batch) -> Tensor:
        inputs, features_fn, std = batch.inputs, batch.features_of, batch.std
        if inputs is None or features_fn is None:
            raise ValueError("mds_ensemble perturbs the input images: its Batch needs inputs and features_of")
        weights = self.weights or (1.0,) * len(self.stage_names)
        total = torch.zeros(len(inputs), dtype=torch.float64, device=inputs.device)
        for name, weight in zip(self.stage_names, weights, strict=True):
            moved = inputs.detach()
            if self.epsilon:
                with torch.inference_mode(False), torch.enable_grad():
                    x = inputs.detach().clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(self.closest(name, x, features_fn).sum(), x)
                step = torch.where(grad >= 0, 1.0, -1.0)
                if self.scale_by_std:
                    if std is None:
                        raise ValueError("mds_ensemble with scale_by_std=True needs the normalisation std")
                    step = step / torch.as_tensor(std, dtype=step.dtype, device=step.device).view(1, -1, 1, 1)
                moved = inputs.detach() - self.epsilon * step  # closer to the nearest class mean
            with torch.no_grad():
                total -= weight * self.closest(name, moved, features_fn)
        return total.to(inputs.dtype)


@statistic
class StageGaussians(Statistic):
    """``stages``: per stage output of the backbone (``backbone.stages()``), the class means and the shared
    covariance of its channel means (Lee et al.'s layer ensemble)."""

    name = "stages"
    fields = ("stages",)

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        self.names = list(setup.backbone.stages()) if setup.backbone is not None else []
        self.sums: dict[str, Tensor] = {}
        self.outer: dict[str, Tensor] = {}

    def blocks(self) -> list[str]:
        return self.names

    def update(self, batch: StatisticsBatch) -> None:
        for name in self.names:
            out = batch.blocks[name]
            pooled = out.flatten(2).mean(dim=2) if out.ndim == 4 else out.mean(dim=1)
            s = pooled.detach().to("cpu", torch.float64)  # (B, S)
            if name not in self.sums:
                self.sums[name] = torch.zeros(self.setup.num_classes, s.shape[1], dtype=torch.float64)
                self.outer[name] = torch.zeros(s.shape[1], s.shape[1], dtype=torch.float64)
            self.sums[name].index_add_(0, batch.labels, s)
            self.outer[name] += s.T @ s

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        counts, n = core["counts"], core["n"]
        stages = {}
        for name in self.names:
            sums, outer = reduce.sum(self.sums[name]), reduce.sum(self.outer[name])
            means = sums / counts[:, None]
            stages[name] = {
                "counts": counts.round().long(),
                "class_means": means,
                "covariance": (outer - (means.T * counts) @ means) / n,
            }
        return {"stages": stages}
