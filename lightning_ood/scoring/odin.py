"""ODIN: temperature scaling and input perturbation (Liang et al., ICLR 2018).

ODIN needs the network and the input images, not just features: its :class:`~lightning_ood.scoring.base.Batch` carries
the inputs and the network from inputs to features::

    odin = build_scorer("odin").fit(train_features, train_labels, model.head)
    scores = odin(Batch(features, logits, inputs=images, features_of=model.features, std=(0.2470, 0.2435, 0.2616)))

Steps: ``y = argmax f(x)``; ``g = sign(grad_x CE(f(x) / T, y))`` (a zero gradient counts as +1), divided per channel
by the normalisation std when given (OpenOOD; the step is then ``epsilon`` in pixel units); ``x' = x - epsilon * g``;
score = max softmax ``(f(x') / T)``, as its logarithm (the same order). With a ``base`` logit scorer (ReAct, FMLS,
...) the base's modified logits are used in both passes (ODIN + ReAct / ODIN + Ours of the paper's Table IV).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.precision import device_constant
from lightning_ood.scoring.base import (
    Batch,
    LogitScorer,
    Needs,
    Scorer,
    check_nonnegative,
    check_positive,
    log_max_softmax,
)
from lightning_ood.statistics import FeatureStatistics


class ODIN(Scorer):
    """ODIN on top of the plain head (``base=None``) or on top of a logit-modifying scorer.

    Args:
        temperature: softmax temperature T (1000).
        epsilon: perturbation magnitude (0.0014 in OpenOOD; the paper's code uses 0.004 without std division).
        scale_by_std: divide the gradient sign by the per-channel normalisation std of the Batch (``std``).
        base: a :class:`LogitScorer` whose modified logits replace the head's.
    """

    needs_inputs = True

    def __init__(
        self,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        scale_by_std: bool = True,
        base: LogitScorer | None = None,
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_nonnegative("epsilon", epsilon)
        self.temperature = temperature
        self.epsilon = epsilon
        self.scale_by_std = scale_by_std
        self.base = base

    @property
    def references(self) -> set[str]:
        return self.base.references if self.base is not None else set()

    def bind(self, backbone: nn.Module) -> ODIN:
        if self.base is not None:
            self.base.bind(backbone)
        return self

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> ODIN:
        super().fit_statistics(stats, head)
        if self.base is not None:
            self.base.fit_statistics(stats, head)
        return self

    def modified_logits(self, features: Tensor) -> Tensor:  # (N, L) -> (N, C)
        logits = self.head_logits(features)
        return logits if self.base is None else self.base.logits(features, logits)

    @property
    def needs(self) -> Needs:
        return super().needs | (self.base.needs if self.base is not None else Needs())

    def forward(self, batch: Batch) -> Tensor:  # (N, 3, H, W) -> (N,)
        """Perturb the (normalised) inputs against the loss of their predicted class and score them again."""
        if batch.inputs is None or batch.features_of is None:
            raise ValueError("ODIN perturbs the input images: its Batch needs inputs and features_of")
        return self.perturbed_score(batch.inputs, batch.features_of, batch.std)

    def direction(self, grad: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, 3, H, W)
        """The step's direction per input value: the gradient's sign, a zero gradient counting as +1 (iODIN
        keeps one value of it, :mod:`lightning_ood.scoring.iodin`)."""
        return torch.where(grad >= 0, 1.0, -1.0)

    def perturbed_score(
        self, inputs: Tensor, features_fn: Callable[[Tensor], Tensor], std: Sequence[float] | None = None
    ) -> Tensor:  # (N, 3, H, W) -> (N,)
        with torch.inference_mode(False), torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            logits = self.modified_logits(features_fn(x)) / self.temperature
            loss = F.cross_entropy(logits, logits.argmax(dim=1))
            (grad,) = torch.autograd.grad(loss, x)
        step = self.direction(grad)
        if self.scale_by_std:
            if std is None:
                raise ValueError("ODIN with scale_by_std=True needs the normalisation std of the inputs")
            step = step / device_constant(std, step.dtype, step.device).view(1, -1, 1, 1)
        perturbed = inputs.detach() - self.epsilon * step
        with torch.no_grad():
            # float64: at T = 1000 the probabilities differ from 1/C in the 5th digit, below float32 resolution
            return log_max_softmax(self.modified_logits(features_fn(perturbed)), self.temperature)
