"""Scores of the softmax distribution: Entropy, GEN, temperature scaling, KL matching, and GradNorm.

All are one pass over the logits (GradNorm also reads the features); none changes the network.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.scoring.base import (
    Scorer,
    check_count,
    check_number,
    check_positive,
    check_reference,
    exact_log_softmax,
    log_max_softmax,
    one_minus_softmax,
    reference_set,
    softmax_entropy,
)
from lightning_ood.statistics import (
    FeatureStatistics,
    LogitStatistics,
)


class Entropy(Scorer):
    """The negative Shannon entropy of the softmax, ``sum_c p_c log p_c`` (higher = more confident = ID)."""

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return softmax_entropy(logits)


class GEN(Scorer):
    """Generalized entropy (Liu et al., CVPR 2023): ``-sum over the M largest p_c of p_c^gamma (1 - p_c)^gamma``, as
    the authors' ``benchmark.py`` and OpenOOD (pytorch-ood 0.4 clips p to [1e-7, 1 - 1e-7] first, which ties every
    confident image; here ``1 - p`` is exact down to 1e-308).

    Args:
        gamma: the exponent (0.1, the authors' and OpenOOD's default).
        top: M, the number of largest probabilities summed (100, or every class when there are fewer).
    """

    search_space: ClassVar[dict[str, tuple]] = {
        "gamma": (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0),
        "top": (10, 50, 100, 200, 500, 1000),
    }

    def __init__(self, gamma: float = 0.1, top: int = 100) -> None:
        super().__init__()
        check_positive("gamma", gamma)
        self.gamma = gamma
        self.top = check_count("top", top)

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return -generalized_entropy(logits, self.gamma, self.top)


def generalized_entropy(logits: Tensor, gamma: float, top: int) -> Tensor:  # (N, C) -> (N,) float64
    """``sum over the top largest p_c of p_c^gamma (1 - p_c)^gamma`` (every class when ``top`` exceeds them, as the
    authors' slice), with ``1 - p`` exact for ``p`` near 1 (:func:`~lightning_ood.scoring.base.exact_log_softmax`):
    a float32 softmax rounds it to 0 there, which makes ``(1 - p)^gamma`` 0 instead of e.g. 0.02."""
    log_p = exact_log_softmax(logits).topk(min(top, logits.shape[1]), dim=1).values
    return (log_p.exp() ** gamma * one_minus_softmax(log_p) ** gamma).sum(dim=1)


class TemperatureScaling(Scorer):
    """Maximum softmax probability at the temperature T that minimises the negative log-likelihood of held-out ID
    images with known labels (Guo et al., ICML 2017; OpenOOD's ``temp_scaling``).

    T is fitted on validation images that are never scored, as its authors do (gpleiss/temperature_scaling holds
    5,000 training images out of training for it; OpenOOD fits on its ID validation list). Without
    ``data.val_split`` the ``id_val`` images are training images the network was trained on, on which it is more
    often right and more confident than on unseen images, so T comes out smaller: set ``data.val_split`` (and train
    with it) to follow the authors.

    Args:
        reference: the labelled ID images T is fitted on: ``id_val`` (the only choice: see
            :func:`lightning_ood.fitting.reference_images`).
    """

    def __init__(self, reference: str = "id_val") -> None:
        super().__init__()
        self.reference = check_reference(reference, ("id_val",))

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> TemperatureScaling:
        super().fit_statistics(stats, head)
        ref = reference_set(stats, self.reference)
        self.temperature = fit_temperature(ref.logits, ref.labels)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return log_max_softmax(logits, self.temperature)  # its logarithm: the same order, no ties at 1.0


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The T > 0 minimising the mean cross-entropy of ``logits / T``: Newton's method on log T from T = 1 (the loss
    is smooth in log T), to full float64 precision."""
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    for _ in range(100):
        loss = F.cross_entropy(z / log_t.exp(), y)
        (grad,) = torch.autograd.grad(loss, log_t, create_graph=True)
        (hess,) = torch.autograd.grad(grad, log_t)
        grad, hess = grad.detach(), hess.detach()
        step = grad / hess if hess > 0 else grad.sign() * 0.5  # a concave region: a bounded gradient step
        with torch.no_grad():
            log_t -= step.clamp(-2.0, 2.0)
        if abs(float(step)) < 1e-12:
            break
    return float(log_t.detach().exp())


class KLMatching(Scorer):
    """KL matching (Hendrycks et al., ICML 2022): ``-min_c KL(p || d_c)``, with ``d_c`` the mean softmax of the ID
    images the network predicts as class c (a class never predicted gets the one-hot template, as OpenOOD).

    Args:
        reference: where the templates come from: ``id_val`` (default: held-out ID images that are never scored; the
            authors and OpenOOD's ``kl_matching_postprocessor.py`` use ID validation images) or ``train`` (every
            training image of the statistics; not the authors' choice, which this project used to make).
    """

    needs_statistics = frozenset({LogitStatistics})

    def __init__(self, reference: str = "id_val") -> None:
        super().__init__()
        self.reference = check_reference(reference, ("id_val", "train"))

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> KLMatching:
        super().fit_statistics(stats, head)
        classes = head.out_features
        if self.reference == "train":
            templates, counts = stats.predicted_softmax.double(), stats.predicted_counts
        else:
            ref = reference_set(stats, self.reference)
            p = ref.logits.double().softmax(dim=1)
            predicted = p.argmax(dim=1)
            counts = torch.bincount(predicted, minlength=classes)
            templates = p.new_zeros(classes, classes).index_add_(0, predicted, p)
            templates = templates / counts.clamp_min(1)[:, None]
        unseen = counts == 0
        templates[unseen] = torch.eye(classes, dtype=torch.float64, device=templates.device)[unseen]
        self.log_templates = templates.clamp_min(1e-12).log()  # (C, C)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        log_p = exact_log_softmax(logits)  # (N, C)
        kl = (log_p.exp() * log_p).sum(dim=1, keepdim=True) - log_p.exp() @ self.log_templates.T  # (N, C)
        return -kl.min(dim=1).values


class GradNorm(Scorer):
    """GradNorm (Huang et al., NeurIPS 2021): the L1 norm of the gradient of KL(uniform || softmax(f / T)) with respect
    to the last layer's weight W.

    The gradient with respect to W is ``(softmax(f / T) - 1/C) h^T / T``, an outer product, so its L1 norm factorises:
    ``||h||_1 * sum_c |p_c - 1/C| / T``; no autograd pass is needed (tests check it against autograd). OpenOOD sums
    the cross-entropies instead of averaging them, which scales every score by C and changes no metric.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        self.temperature = temperature

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        p = (logits.double() / self.temperature).softmax(dim=1)
        uniform = 1.0 / p.shape[1]
        return features.double().abs().sum(dim=1) * (p - uniform).abs().sum(dim=1) / self.temperature


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
    return value


__all__ = ["GEN", "Entropy", "GradNorm", "KLMatching", "TemperatureScaling", "check_choice", "check_number"]
