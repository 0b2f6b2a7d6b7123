"""The scorer contract: ``fit`` on training features once, then ``score(features, logits) -> (N,)``.

Higher score = more in-distribution, for every scorer. Scorers are plain objects (no config objects, no devices baked
in): hyperparameters are fixed at construction; ``fit`` stores what the training data and the head determine.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.statistics import FeatureStatistics

try:  # Python 3.11+
    from typing import Self
except ImportError:  # pragma: no cover
    from typing_extensions import Self


class Scorer:
    """Base class. Subclasses implement :meth:`fit_statistics` and :meth:`score`.

    Attributes:
        needs_inputs: the scorer works on input images (see :class:`~lightning_ood.scoring.odin.ODIN`) rather than on
            precomputed features and logits.
        needs_blocks: names of intermediate blocks whose outputs the scorer reads through ``score_blocks`` (see
            :class:`~lightning_ood.scoring.featurenorm.FeatureNorm`).
        needs_statistics: statistics beyond the core ones that the training pass must accumulate for this scorer
            (``"logits"``, ``"bank"``, ``"stages"``, ``"gram"``; see :mod:`lightning_ood.statistics`).
        search_space: the hyperparameter grid ``lightning-ood tune`` searches for this scorer (its authors' grid).
    """

    needs_inputs: ClassVar[bool] = False
    needs_blocks: tuple[str, ...] = ()
    needs_statistics: ClassVar[frozenset[str]] = frozenset()
    search_space: ClassVar[dict[str, tuple]] = {}

    @property
    def references(self) -> set[str]:
        """ID image sets other than the training set the scorer fits on (``id_test``, ``val``)."""
        reference = getattr(self, "reference", "train")
        return set() if reference == "train" else {reference}

    def bind(self, backbone: nn.Module) -> Self:
        """Give the scorer the network, for methods that read more than the features and the head (BATS reads its
        last BatchNorm); called before fitting. Most scorers need nothing."""
        return self

    def fit(self, features: Tensor, labels: Tensor, head: nn.Linear) -> Self:
        """Fit on training features ``(N, L)``, their ground-truth labels ``(N,)`` and the classifier head."""
        return self.fit_statistics(FeatureStatistics.from_features(features, labels, head.out_features, head), head)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Self:
        """Fit from precomputed :class:`FeatureStatistics` (what the Lightning pipeline does)."""
        self.weight = head.weight.detach().clone()  # (C, L)
        self.bias = head.bias.detach().clone() if head.bias is not None else torch.zeros(head.out_features)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:  # (N, L), (N, C) -> (N,)
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Self:
        """Move every fitted tensor to ``device``."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, Scorer):
                value.to(device)
        return self

    def head_logits(self, features: Tensor) -> Tensor:  # (N, L) -> (N, C)
        return torch.addmm(self.bias.to(features.dtype), features, self.weight.T.to(features.dtype))

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if isinstance(v, str | int | float | bool | tuple | type(None))}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


# ------------------------------------------------------------------------------------------------ score functions
def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:  # (N, C) -> (N,)
    """Negative free energy ``T * logsumexp(f / T)`` (Liu et al., 2020)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def max_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:  # (N, C) -> (N,)
    """Maximum softmax probability (Hendrycks & Gimpel, 2017); ``temperature`` as in ODIN."""
    return F.softmax(logits / temperature, dim=1).amax(dim=1)


OUTPUTS = {"energy": energy, "msp": max_softmax}


def check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ConfigError(f"Unknown score output {output!r}. Choose one of: {', '.join(OUTPUTS)}.")
    return output


def check_number(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value != value):
        raise ConfigError(f"{name} must be a number, got {value!r}.")


def check_percentile(name: str, value: float | None) -> None:
    check_number(name, value)
    if value is not None and not 0.0 <= value <= 100.0:
        raise ConfigError(f"{name} must be a percentile in [0, 100], got {value}.")


def check_positive(name: str, value: float) -> None:
    check_number(name, value)
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}.")


REFERENCES = ("train", "id_test", "val")


def check_reference(reference: str, allowed: tuple[str, ...] = REFERENCES) -> str:
    """``train``: the training images (the statistics); ``id_test``: a seeded subset of 2,000 ID test images;
    ``val``: the held-out training images of ``data.val_split``."""
    if reference not in allowed:
        raise ConfigError(f"reference must be one of {', '.join(allowed)}, got {reference!r}.")
    return reference


def reference_set(stats: FeatureStatistics, reference: str):
    """The :class:`~lightning_ood.statistics.ReferenceSet` of ``reference`` measured for this run."""
    if reference not in stats.reference:
        raise ConfigError(f"no {reference!r} reference images were measured for these statistics")
    return stats.reference[reference]


def softmax_entropy(logits: Tensor) -> Tensor:  # (N, C) -> (N,): sum p log p (the negative entropy)
    log_p = F.log_softmax(logits.double(), dim=1)
    return (log_p.exp() * log_p).sum(dim=1)


def check_nonnegative(name: str, value: float | None) -> None:
    check_number(name, value)
    if value is not None and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}.")


class LogitScorer(Scorer):
    """A scorer that turns (possibly modified) logits into a score with ``output`` (energy or MSP).

    Subclasses override :meth:`logits`; ODIN reuses it for its perturbation pass, so any logit-modifying method
    combines with ODIN.
    """

    def __init__(self, output: str = "energy") -> None:
        self.output = check_output(output)

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:  # (N, L), (N, C) -> (N, C)
        return logits

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return OUTPUTS[self.output](self.logits(features, logits))
