"""Training-set feature statistics that post-hoc OOD scorers are fitted on, accumulated in one streaming pass.

Everything a scorer needs is derived from sums that add up across batches and across processes, so the result is the
same whatever the batching and the number of DDP ranks (up to float64 rounding of the sums):

- per-class counts and feature sums -> class means (the paper's prototypes; Mahalanobis means; LINE contributions);
- the sum of outer products -> the shared within-class covariance (Mahalanobis);
- per-unit sums of squares -> per-unit mean and standard deviation (BATS; the mean feature for DICE);
- the activation values themselves -> exact percentiles of all activations (ReAct's clipping threshold).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

QUANTILE_STEP = 0.1  # percentiles are stored at p = 0, 0.1, ..., 100
QUANTILE_GRID = torch.linspace(0.0, 100.0, round(100 / QUANTILE_STEP) + 1, dtype=torch.float64)


def percentile(values: Tensor, p: float | Tensor, dim: int | None = None) -> Tensor:
    """``numpy.percentile`` with its default linear interpolation, for any tensor size (``torch.quantile`` is not).

    Args:
        values: input tensor.
        p: percentile(s) in [0, 100]; a tensor gives one result per entry (along a new trailing dimension when ``dim``
            is set).
        dim: reduce along this dimension; ``None`` flattens.
    """
    x = values.flatten() if dim is None else values.movedim(dim, -1)
    x = x.sort(dim=-1).values
    n = x.shape[-1]
    if n == 0:
        raise ValueError("percentile of an empty tensor")
    # numpy: virtual index (n - 1) * p / 100, gamma = its fractional part, lerp in the input dtype from the upper
    # end when gamma >= 0.5. Matching its rounding step by step makes thresholds identical to numpy's, so ties at a
    # threshold fall on the same side.
    q = torch.as_tensor(p, dtype=torch.float64, device=x.device) / 100.0
    pos = ((n - 1) * q).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    gamma = pos - lo
    if q.ndim:
        lo_v, hi_v = x[..., lo], x[..., hi]
    else:
        lo_v, hi_v = x[..., lo.item()], x[..., hi.item()]
    if not x.is_floating_point():
        lo_v, hi_v = lo_v.double(), hi_v.double()
    t = gamma.to(lo_v.dtype)
    one_minus_t = (1 - gamma).to(lo_v.dtype)
    diff = hi_v - lo_v
    return torch.where(gamma >= 0.5, hi_v - diff * one_minus_t, lo_v + diff * t)


@dataclass
class FeatureStatistics:
    """Sufficient statistics of the penultimate features of the training set.

    Attributes:
        counts: (C,) training images per ground-truth class.
        class_means: (C, L) mean feature per class: the prototypes v_c of the paper.
        mean: (L,) mean feature over all training images.
        std: (L,) per-unit standard deviation (population, divide by N).
        covariance: (L, L) shared within-class covariance (maximum likelihood, divide by N).
        activation_quantiles: (1001,) percentiles p = 0, 0.1, ..., 100 of all activations (all units, all images).
        weights: fingerprint of the network (and input normalisation) the statistics were computed with ("" when
            unknown); a test on other weights recomputes them.
        images: which training images they were fitted on ("" when unknown), e.g. "cifar10 training images, 2000
            held out (seed 0)"; a run configured with other images recomputes them.
    """

    counts: Tensor
    class_means: Tensor
    mean: Tensor
    std: Tensor
    covariance: Tensor
    activation_quantiles: Tensor
    weights: str = ""
    images: str = ""
    # Percentile grids of activations of other image sets (not stored: they depend on the run), e.g. "id_test".
    reference_quantiles: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return self.class_means.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.class_means.shape[1]

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def activation_percentile(self, p: float, reference: str = "train") -> float:
        """The p-th percentile of all training activations (exact for p on the 0.1 grid); with ``reference`` another
        image set's activations (``reference_quantiles``)."""
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {p}")
        index = p / QUANTILE_STEP
        if abs(index - round(index)) > 1e-6:
            raise ValueError(f"activation percentiles are stored on a {QUANTILE_STEP} grid; got {p}")
        if reference == "train":
            return float(self.activation_quantiles[round(index)])
        if reference not in self.reference_quantiles:
            raise ValueError(f"no {reference!r} activations were measured for these statistics")
        return float(self.reference_quantiles[reference][round(index)])

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reference_quantiles"}

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureStatistics:
        names = {f.name for f in fields(cls)}
        missing = names - set(state) - {"weights", "images", "reference_quantiles"}
        if missing:
            raise KeyError(f"OOD statistics are missing {sorted(missing)}")
        return cls(**{k: v for k, v in state.items() if k in names})

    @classmethod
    def from_features(cls, features: Tensor, labels: Tensor, num_classes: int | None = None) -> FeatureStatistics:
        """Statistics of an in-memory feature matrix ``(N, L)`` with labels ``(N,)``."""
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        acc = StatisticsAccumulator(num_classes, features.shape[1])
        acc.update(features, labels)
        return acc.compute()


Reduce = Callable[[Tensor], Tensor]


class StatisticsAccumulator:
    """Streaming accumulation of :class:`FeatureStatistics` over batches (and, through ``compute``, over ranks).

    Args:
        num_classes: C.
        feature_dim: L.
        quantile_stride: keep the activations of one sample in ``quantile_stride`` (by dataset index) for the
            percentiles; 1 keeps all of them (exact). Use a larger stride when N x L values do not fit in memory.
    """

    def __init__(self, num_classes: int, feature_dim: int, quantile_stride: int = 1) -> None:
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.quantile_stride = quantile_stride
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.class_sums = torch.zeros(num_classes, feature_dim, dtype=torch.float64)
        self.sum_sq = torch.zeros(feature_dim, dtype=torch.float64)
        self.outer = torch.zeros(feature_dim, feature_dim, dtype=torch.float64)
        self.kept: list[Tensor] = []

    def update(self, features: Tensor, labels: Tensor, indices: Tensor | None = None) -> None:
        """Add a batch: features (B, L), ground-truth labels (B,), dataset indices (B,) for the quantile stride."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape (B, {self.feature_dim}), got {tuple(features.shape)}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
        h = features.detach().to("cpu", torch.float64)  # (B, L)
        labels = labels.detach().cpu()
        self.counts += torch.bincount(labels, minlength=self.num_classes).double()
        self.class_sums.index_add_(0, labels, h)
        self.sum_sq += (h * h).sum(0)
        self.outer += h.T @ h  # (L, L)
        keep = features.detach().cpu()
        keep = keep if keep.dtype == torch.float64 else keep.float()  # exact percentiles of what the net produced
        if self.quantile_stride > 1:
            if indices is None:
                raise ValueError("a quantile stride > 1 needs the dataset indices of the batch")
            keep = keep[indices.cpu() % self.quantile_stride == 0]
        self.kept.append(keep.flatten())

    def compute(self, sum_across: Reduce | None = None, gather_across: Reduce | None = None) -> FeatureStatistics:
        """Finalise; ``sum_across`` / ``gather_across`` reduce a tensor over DDP ranks (identity by default)."""
        sum_across = sum_across or (lambda t: t)
        gather_across = gather_across or (lambda t: t)
        counts = sum_across(self.counts)
        class_sums = sum_across(self.class_sums)
        sum_sq = sum_across(self.sum_sq)
        outer = sum_across(self.outer)
        n = counts.sum()
        if n == 0:
            raise ValueError("no training features were accumulated")
        if (counts == 0).any():
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"classes {empty} have no training images: their prototypes are undefined")
        class_means = class_sums / counts[:, None]
        mean = class_sums.sum(0) / n
        var = (sum_sq / n - mean * mean).clamp_min(0)
        # Within-class scatter: sum_i h_i h_i^T - sum_c N_c mu_c mu_c^T, divided by N.
        covariance = (outer - (class_means.T * counts) @ class_means) / n
        values = gather_across(torch.cat(self.kept) if self.kept else torch.empty(0))
        quantiles = percentile(values.double(), QUANTILE_GRID)
        return FeatureStatistics(
            counts=counts.round().long(),
            class_means=class_means,
            mean=mean,
            std=var.sqrt(),
            covariance=covariance,
            activation_quantiles=quantiles,
        )


def quantile_stride(num_samples: int, feature_dim: int, max_values: int) -> int:
    """Smallest stride such that ``num_samples / stride * feature_dim`` activation values fit in ``max_values``."""
    return max(1, math.ceil(num_samples * feature_dim / max_values))
