"""Training-set feature statistics that post-hoc OOD scorers are fitted on, accumulated in one streaming pass.

Everything a scorer needs is derived from sums that add up across batches and across processes, so the result is the
same whatever the batching and the number of DDP ranks (up to float64 rounding of the sums):

- per-class counts and feature sums -> class means (the paper's prototypes; Mahalanobis means; LINE contributions);
- the sum of outer products -> the shared within-class covariance (Mahalanobis) and, with the class means, the
  total second moment (RMDS's class-agnostic Gaussian, ViM's principal subspace);
- per-unit sums of squares -> per-unit mean and standard deviation (BATS; the mean feature for DICE, fDBD, NCI);
- the activation values themselves -> exact percentiles of all activations (ReAct's clipping threshold);
- with the head's logits: the mean softmax per predicted class (KL matching) and the mean feature of the correctly
  classified images per class (SHE).

Extras that only some scorers need are accumulated when asked for (``extras``), so a checkpoint carries only what its
configured scorers use:

- ``bank``: the features of (a stride of) the training images, float16 (float32 beyond its range), with their
  labels, ordered by dataset index (KNN, ViM's scale, NNGuide, Relation, OpenMax);
- ``stages``: per stage output of the backbone (``backbone.stages()``), the channel means' class means and shared
  covariance (Mahalanobis with the layer ensemble of Lee et al.);
- ``gram``: per block output (``backbone.blocks()``), order p = 1 ... ``GRAM_POWERS`` and predicted class, the
  minimum and maximum of the Gram features over the training images, and each block's mean deviation on one
  training image in ``GRAM_HOLDOUT`` (left out of the bounds), which normalises it (Sastry & Oore, ICML 2020).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

QUANTILE_STEP = 0.1  # percentiles are stored at p = 0, 0.1, ..., 100
QUANTILE_GRID = torch.linspace(0.0, 100.0, round(100 / QUANTILE_STEP) + 1, dtype=torch.float64)
EXTRAS = ("bank", "stages", "gram")
GRAM_CHUNK_ELEMENTS = 2**20  # float32 values per chunk of images in gram_features (4 MB)
GRAM_POWERS = 10  # Gram orders 1 ... 10, as Sastry & Oore
GRAM_HOLDOUT = 50  # one training image in 50 normalises the deviations instead of setting the bounds


def gram_features(block_output: Tensor, powers: int = GRAM_POWERS) -> Tensor:  # (N, C, H, W) or (N, T, D) -> (N, P, C)
    """Sastry & Oore's Gram features of one block output: for p = 1 ... ``powers``, the row sums of the Gram matrix
    of the map raised element-wise to p, ``G_p = (x^p)(x^p)^T 1``, brought back to the scale of x by the signed p-th
    root. Row sums need no C x C matrix: ``(x^p)(x^p)^T 1 = (x^p) ((x^p)^T 1)``.

    In float32, as the authors, but without their overflow (x^20 exceeds float32 for activations above ~80, which OOD
    inputs reach): each image's map is scaled to a largest absolute value of t = 2^(48 // powers) (16 for ten orders)
    first, so that no product of two powers exceeds 2^96 per term, and the root brings the scale back exactly,
    ``root_p(G_p(x)) = (m / t)^2 root_p(G_p(x t / m))``. The result agrees with float64 to about 1e-5 m^2 (m: the
    image's largest |activation|); channels far below m (under ~1e-3 m) lose their highest orders, as small
    activations do in the authors' float32. 2x faster than float64. A few images at a time, so that the ten orders'
    passes stay in the CPU cache (3x faster than the whole batch at once)."""
    per_image = block_output[0].numel() if len(block_output) else 1
    step = max(1, GRAM_CHUNK_ELEMENTS // per_image)
    return torch.cat([_gram_features(chunk, powers) for chunk in block_output.split(step)])


def _gram_features(block_output: Tensor, powers: int) -> Tensor:
    x = block_output.float()
    x = x.flatten(2) if x.ndim == 4 else x.transpose(1, 2)  # (N, C, S)
    largest = x.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    scale = largest / 2.0 ** (48 // powers)
    x = x / scale
    sums = []
    a = x
    for p in range(1, powers + 1):
        a = x if p == 1 else (x * x if p == 2 else a.mul_(x))  # x^p by one product per order (pow is ~10x slower)
        sums.append((a @ a.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(2))  # (N, C)
    rows = torch.stack(sums, dim=1)  # (N, P, C)
    roots = 1.0 / torch.arange(1, powers + 1, dtype=rows.dtype, device=rows.device).view(1, powers, 1)
    return rows.sign() * rows.abs().pow(roots) * scale.view(-1, 1, 1).square()


def gram_deviation(features: Tensor, mins: Tensor, maxs: Tensor, classes: Tensor) -> Tensor:  # -> (N,)
    """How far Gram features (N, P, C) fall outside the [min, max] of each image's class (mins/maxs: (K, P, C)),
    relative to the bounds, summed over orders and channels (Sastry & Oore's deviation)."""
    low, high = mins[classes], maxs[classes]
    below = (low - features).clamp_min(0) / (low + 1e-6).abs()
    above = (features - high).clamp_min(0) / (high + 1e-6).abs()
    return (below + above).flatten(1).sum(dim=1)


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
class FeatureSet:
    """Features (N, L), logits (N, C) and labels (N,) of a set of images: the one record of what the network
    produced for them (cached features, reference images). ``images`` says which images and ``weights`` under which
    network (its fingerprint), where known: a reference set measured before on the same images and weights is reused
    instead of measured again."""

    features: Tensor
    logits: Tensor
    labels: Tensor
    images: str = ""
    weights: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> FeatureSet:
        return FeatureSet(
            self.features.to(device), self.logits.to(device), self.labels.to(device), self.images, self.weights
        )


ReferenceSet = FeatureSet  # the name checkpoints and scripts of earlier versions use


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
        predicted_counts: (C,) training images per predicted class (needs the head's logits).
        predicted_softmax: (C, C) mean softmax of the training images per predicted class (row c: predicted c).
        correct_counts: (C,) correctly classified training images per class.
        correct_means: (C, L) mean feature of the correctly classified training images per class.
        bank: (M, L) features of the training images with index divisible by ``bank_stride``, in index order;
            float16, or float32 when a feature exceeds float16's range (65,504).
        bank_labels: (M,) their labels.
        bank_stride: one training image in ``bank_stride`` is in the bank (1: all).
        stages: per stage output name, ``{"counts": (C,), "class_means": (C, S), "covariance": (S, S)}`` of the
            channel means of that output.
        gram: per block name, ``{"mins": (C, P, S), "maxs": (C, P, S), "normalizer": ()}``: the bounds of its Gram
            features per predicted class and its mean deviation on held-out training images.
        reference: ID image sets measured at run time (kept in memory for the next run, not stored), e.g.
            ``{"id_test": FeatureSet}``.
    """

    counts: Tensor
    class_means: Tensor
    mean: Tensor
    std: Tensor
    covariance: Tensor
    activation_quantiles: Tensor
    weights: str = ""
    images: str = ""
    predicted_counts: Tensor | None = None
    predicted_softmax: Tensor | None = None
    correct_counts: Tensor | None = None
    correct_means: Tensor | None = None
    bank: Tensor | None = None
    bank_labels: Tensor | None = None
    bank_stride: int = 0
    stages: dict[str, dict[str, Tensor]] | None = None
    gram: dict[str, dict[str, Tensor]] | None = None
    reference: dict[str, FeatureSet] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return self.class_means.shape[0]

    @property
    def device(self) -> torch.device:
        return self.class_means.device

    def to(self, device: torch.device | str) -> FeatureStatistics:
        """The same statistics on ``device``, every tensor (extras and reference sets too) in its own dtype: the
        sums are float64 by design, whatever the network's precision (a scorer casts what it fits to the head's)."""
        device = torch.device(device)
        if device == self.device:
            return self

        def move(value):
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, FeatureSet):
                return value.to(device)
            return value

        return FeatureStatistics(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def cpu_state_dict(self) -> dict:
        """:meth:`state_dict` with every tensor on the CPU (what checkpoints and caches store)."""
        return FeatureStatistics.to(self, "cpu").state_dict()

    @property
    def feature_dim(self) -> int:
        return self.class_means.shape[1]

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def second_moment(self) -> Tensor:
        """(L, L) mean of h h^T over all training images: within-class covariance plus the class means' scatter."""
        weights = (self.counts.double() / self.counts.sum())[:, None]
        means = self.class_means.double()
        return self.covariance.double() + (means * weights).T @ means

    @property
    def total_covariance(self) -> Tensor:
        """(L, L) covariance of all training features around their mean (RMDS's class-agnostic Gaussian)."""
        mean = self.mean.double()
        return self.second_moment - torch.outer(mean, mean)

    def provides(self, needs: set[str]) -> set[str]:
        """Which of ``needs`` (``"logits"``, ``"bank"``, ``"stages"``) these statistics lack."""
        present = {
            "logits": self.predicted_softmax is not None,
            "bank": self.bank is not None,
            "stages": self.stages is not None,
            "gram": self.gram is not None,
        }
        return {need for need in needs if not present.get(need, False)}

    def activation_percentile(self, p: float, reference: str = "train") -> float:
        """The p-th percentile of all training activations (exact for p on the 0.1 grid); with ``reference`` of the
        activations of that reference set (:attr:`reference`), exact for any p."""
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {p}")
        if reference != "train":
            if reference not in self.reference:
                raise ValueError(f"no {reference!r} activations were measured for these statistics")
            return float(percentile(self.reference[reference].features.double(), p))
        index = p / QUANTILE_STEP
        if abs(index - round(index)) > 1e-6:
            raise ValueError(f"activation percentiles are stored on a {QUANTILE_STEP} grid; got {p}")
        return float(self.activation_quantiles[round(index)])

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reference"}

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureStatistics:
        required = {"counts", "class_means", "mean", "std", "covariance", "activation_quantiles"}
        missing = required - set(state)
        if missing:
            raise KeyError(f"OOD statistics are missing {sorted(missing)}")
        names = {f.name for f in fields(cls)} - {"reference"}
        return cls(**{k: v for k, v in state.items() if k in names})

    @classmethod
    def from_features(
        cls, features: Tensor, labels: Tensor, num_classes: int | None = None, head: torch.nn.Module | None = None
    ) -> FeatureStatistics:
        """Statistics of an in-memory feature matrix ``(N, L)`` with labels ``(N,)``; with the ``head`` also the
        logit-based statistics and a bank of every feature."""
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        acc = StatisticsAccumulator(num_classes, features.shape[1], bank_stride=1 if head is not None else 0)
        with torch.no_grad():
            logits = head(features) if head is not None else None
        acc.update(features, labels, torch.arange(len(labels)), logits)
        return acc.compute()


Reduce = Callable[[Tensor], Tensor]


class StatisticsAccumulator:
    """Streaming accumulation of :class:`FeatureStatistics` over batches (and, through ``compute``, over ranks).

    Args:
        num_classes: C.
        feature_dim: L.
        quantile_stride: keep the activations of one sample in ``quantile_stride`` (by dataset index) for the
            percentiles; 1 keeps all of them (exact). Use a larger stride when N x L values do not fit in memory.
        bank_stride: keep the features of one sample in ``bank_stride`` (by dataset index) in the bank; 0 keeps no
            bank.
        stages: names of the stage outputs whose statistics to accumulate (``update``'s ``stage_features``).
        gram: names of the block outputs whose Gram bounds to accumulate (``update``'s ``block_outputs``; needs the
            logits).
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        quantile_stride: int = 1,
        bank_stride: int = 0,
        stages: list[str] | None = None,
        gram: list[str] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.quantile_stride = quantile_stride
        self.bank_stride = bank_stride
        c, f64 = num_classes, torch.float64
        self.counts = torch.zeros(c, dtype=f64)
        self.class_sums = torch.zeros(c, feature_dim, dtype=f64)
        self.sum_sq = torch.zeros(feature_dim, dtype=f64)
        self.outer = torch.zeros(feature_dim, feature_dim, dtype=f64)
        self.kept: list[Tensor] = []
        self.with_logits = False
        self.predicted_counts = torch.zeros(c, dtype=f64)
        self.predicted_softmax = torch.zeros(c, c, dtype=f64)
        self.correct_counts = torch.zeros(c, dtype=f64)
        self.correct_sums = torch.zeros(c, feature_dim, dtype=f64)
        self.bank: list[tuple[Tensor, Tensor, Tensor]] = []  # (indices, features float32, labels)
        # allocated at the first batch, when the channel counts are known
        self.stages: dict[str, dict[str, Tensor]] = {name: {} for name in stages or []}
        self.gram: dict[str, dict] = {name: {"held": []} for name in gram or []}

    def update(
        self,
        features: Tensor,
        labels: Tensor,
        indices: Tensor | None = None,
        logits: Tensor | None = None,
        stage_features: dict[str, Tensor] | None = None,
        block_outputs: dict[str, Tensor] | None = None,
    ) -> None:
        """Add a batch: features (B, L), ground-truth labels (B,), dataset indices (B,) for the strides, the head's
        logits (B, C), the pooled stage outputs ``{name: (B, S)}`` and the block outputs for the Gram bounds."""
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
        if (self.quantile_stride > 1 or self.bank_stride > 1) and indices is None:
            raise ValueError("a stride > 1 needs the dataset indices of the batch")
        keep = features.detach().cpu()
        keep = keep if keep.dtype == torch.float64 else keep.float()  # exact percentiles of what the net produced
        if self.quantile_stride > 1:
            keep = keep[indices.cpu() % self.quantile_stride == 0]
        self.kept.append(keep.flatten())
        if logits is not None:
            self.with_logits = True
            z = logits.detach().to("cpu", torch.float64)
            predicted = z.argmax(dim=1)
            self.predicted_counts += torch.bincount(predicted, minlength=self.num_classes).double()
            self.predicted_softmax.index_add_(0, predicted, z.softmax(dim=1))
            right = predicted == labels
            self.correct_counts += torch.bincount(labels[right], minlength=self.num_classes).double()
            self.correct_sums.index_add_(0, labels[right], h[right])
        if self.bank_stride:
            index = indices.cpu() if indices is not None else torch.arange(len(labels))
            chosen = index % self.bank_stride == 0
            self.bank.append((index[chosen], features.detach().cpu()[chosen].float(), labels[chosen]))
        for name, stage in self.stages.items():
            s = stage_features[name].detach().to("cpu", torch.float64)  # (B, S)
            if not stage:
                stage["sums"] = torch.zeros(self.num_classes, s.shape[1], dtype=torch.float64)
                stage["outer"] = torch.zeros(s.shape[1], s.shape[1], dtype=torch.float64)
            stage["sums"].index_add_(0, labels, s)
            stage["outer"] += s.T @ s
        if self.gram:
            if logits is None or indices is None:
                raise ValueError("Gram bounds need the logits and the dataset indices of the batch")
            predicted = logits.detach().argmax(dim=1).cpu()
            held = indices.cpu() % GRAM_HOLDOUT == 0
            for name, bounds in self.gram.items():
                g = gram_features(block_outputs[name].detach()).cpu()  # (B, P, S)
                if "mins" not in bounds:
                    shape = (self.num_classes, *g.shape[1:])
                    bounds["mins"] = torch.full(shape, math.inf, dtype=torch.float64)
                    bounds["maxs"] = torch.full(shape, -math.inf, dtype=torch.float64)
                bounds["held"].append((predicted[held], g[held]))
                for c in predicted[~held].unique().tolist():
                    members = g[~held & (predicted == c)]
                    bounds["mins"][c] = torch.minimum(bounds["mins"][c], members.amin(dim=0))
                    bounds["maxs"][c] = torch.maximum(bounds["maxs"][c], members.amax(dim=0))

    def compute(
        self,
        sum_across: Reduce | None = None,
        gather_across: Reduce | None = None,
        min_across: Reduce | None = None,
        max_across: Reduce | None = None,
    ) -> FeatureStatistics:
        """Finalise; ``sum_across`` / ``gather_across`` / ``min_across`` / ``max_across`` reduce a tensor over DDP
        ranks (identity by default)."""
        sum_across = sum_across or (lambda t: t)
        gather_across = gather_across or (lambda t: t)
        min_across = min_across or (lambda t: t)
        max_across = max_across or (lambda t: t)
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
        stats = FeatureStatistics(
            counts=counts.round().long(),
            class_means=class_means,
            mean=mean,
            std=var.sqrt(),
            covariance=covariance,
            activation_quantiles=percentile(values.double(), QUANTILE_GRID),
        )
        if self.with_logits:
            predicted = sum_across(self.predicted_counts)
            correct = sum_across(self.correct_counts)
            stats.predicted_counts = predicted.round().long()
            stats.predicted_softmax = sum_across(self.predicted_softmax) / predicted.clamp_min(1)[:, None]
            stats.correct_counts = correct.round().long()
            stats.correct_means = sum_across(self.correct_sums) / correct.clamp_min(1)[:, None]
        if self.bank_stride:
            indices, bank, labels = (torch.cat(parts) for parts in zip(*self.bank, strict=True)) if self.bank else (
                torch.empty(0, dtype=torch.long), torch.empty(0, self.feature_dim),
                torch.empty(0, dtype=torch.long),
            )  # fmt: skip
            # float16 (half the bytes) unless a feature on some rank is beyond its range (it would become inf)
            largest = float(max_across(bank.abs().amax() if len(bank) else torch.tensor(0.0)))
            bank = bank.to(torch.float16 if largest <= torch.finfo(torch.float16).max else torch.float32)
            indices, bank, labels = gather_across(indices), gather_across(bank), gather_across(labels)
            order = indices.argsort()  # the same bank whatever the number of ranks
            stats.bank, stats.bank_labels, stats.bank_stride = bank[order], labels[order], self.bank_stride
        if self.stages:
            stats.stages = {}
            for name, stage in self.stages.items():
                sums, stage_outer = sum_across(stage["sums"]), sum_across(stage["outer"])
                means = sums / counts[:, None]
                stats.stages[name] = {
                    "counts": counts.round().long(),
                    "class_means": means,
                    "covariance": (stage_outer - (means.T * counts) @ means) / n,
                }
        if self.gram:
            stats.gram = {}
            for name, bounds in self.gram.items():
                mins, maxs = min_across(bounds["mins"]), max_across(bounds["maxs"])
                unseen = torch.isinf(mins)  # a class never predicted: no bounds, no deviation counted for it
                mins, maxs = mins.masked_fill(unseen, 0.0), maxs.masked_fill(unseen, 0.0)
                classes = gather_across(torch.cat([c for c, _ in bounds["held"]]))
                held = gather_across(torch.cat([g for _, g in bounds["held"]]))
                deviation = gram_deviation(held, mins, maxs, classes)
                stats.gram[name] = {"mins": mins, "maxs": maxs, "normalizer": deviation.mean().clamp_min(1e-12)}
        return stats


def quantile_stride(num_samples: int, feature_dim: int, max_values: int) -> int:
    """Smallest stride such that ``num_samples / stride * feature_dim`` activation values fit in ``max_values``."""
    return max(1, math.ceil(num_samples * feature_dim / max_values))


def bank_stride(num_samples: int, bank_images: int) -> int:
    """Smallest stride such that at most about ``bank_images`` training images are in the bank."""
    return max(1, math.ceil(num_samples / max(1, bank_images)))
