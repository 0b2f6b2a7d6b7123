"""Scores of the unmodified network output: MSP, Energy and MaxLogit."""

from __future__ import annotations

from torch import Tensor

from lightning_ood.scoring.base import LogitScorer, Scorer, check_positive, energy, log_max_softmax


class MSP(LogitScorer):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017), scored as its logarithm in float64
    (:func:`~lightning_ood.scoring.base.log_max_softmax`): the same order, so the same AUROC and FPR as the
    probability computed exactly; a float32 softmax instead ties every image whose probability rounds to 1.0."""

    def __init__(self) -> None:
        super().__init__("msp")


class Energy(Scorer):
    """Energy score ``T * logsumexp(f / T)`` (Liu et al., NeurIPS 2020); the paper uses T = 1."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        self.temperature = temperature

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return energy(logits, self.temperature)


class MaxLogit(Scorer):
    """Largest logit (Hendrycks et al., ICML 2022)."""

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return logits.amax(dim=1)


__all__ = ["MSP", "Energy", "MaxLogit", "energy", "log_max_softmax"]
