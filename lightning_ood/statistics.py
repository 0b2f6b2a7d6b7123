"""Training-set feature statistics that post-hoc OOD scorers are fitted on, accumulated in one streaming pass.

Everything a scorer needs is derived from sums and merges that combine across batches and across processes, so the
result is the same whatever the batching and the number of DDP ranks (up to float64 rounding).

The core statistics, which many methods share, are always accumulated:

- per-class counts and feature sums -> class means (the paper's prototypes; Mahalanobis means; LINE contributions);
- the scatter of the features around their class means -> the shared within-class covariance (Mahalanobis) and,
  with the class means, the covariance of all features (RMDS's class-agnostic Gaussian, ViM's principal subspace) and
  the per-unit standard deviation (BATS); the mean feature (DICE, fDBD, NCI). The scatter is accumulated around the
  means (:class:`ClassGaussians`), never as ``E[h h^T] - mu mu^T``: that difference leaves rounding noise of the size
  of the squared means, of either sign, in every direction without variance, which an inverse turns into 1e16;
- the activation values themselves -> exact percentiles of all activations (ReAct's clipping threshold).

Extras that only some methods need are a :class:`Statistic` each, declared by the scorers that read them (their
``needs_statistics``, the classes themselves: no registry, nothing filled by importing) and accumulated in the same
pass only when a configured scorer declares them, so a checkpoint carries only what its scorers use. The ones that
scorers of several files share live here: ``bank`` (the training features: KNN & co.) and ``logits`` (KL matching,
SHE, Gram); the others beside their scorers (``stages``: :mod:`lightning_ood.scoring.ensemble`, ``gram``,
``unit_gaussians``, ...). Their fields are stored flat beside the core ones, as this project's checkpoints always
stored them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

QUANTILE_STEP = 0.1  # percentiles are stored at p = 0, 0.1, ..., 100
QUANTILE_GRID = torch.linspace(0.0, 100.0, round(100 / QUANTILE_STEP) + 1, dtype=torch.float64)
Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


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
    instead of measured again. ``source`` says in words where the images come from (a reference set's, for the
    result files' provenance)."""

    features: Tensor
    logits: Tensor
    labels: Tensor
    images: str = ""
    weights: str = ""
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> FeatureSet:
        return replace(self, features=self.features.to(device), logits=self.logits.to(device),
                       labels=self.labels.to(device))  # fmt: skip


ReferenceSet = FeatureSet  # the name scripts of earlier versions use


@dataclass(frozen=True)
class Reducers:
    """Sum, gather (concatenate in rank order), min and max of a tensor across DDP ranks; the identity in one
    process."""

    sum: Reduce = _identity
    gather: Reduce = _identity
    min: Reduce = _identity
    max: Reduce = _identity


@dataclass
class StatisticsBatch:
    """One batch of the statistics pass, as every statistic sees it.

    Attributes:
        features: (B, L) penultimate features, as the network produced them.
        labels: (B,) ground-truth labels, on the CPU.
        indices: (B,) dataset indices (strides by index keep the result independent of batching and ranks).
        logits: (B, C) the head's logits, or ``None`` when only features are known.
        blocks: block outputs that the statistics declared (:meth:`Statistic.blocks`).
    """

    features: Tensor
    labels: Tensor
    indices: Tensor
    logits: Tensor | None = None
    blocks: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class StatisticsSetup:
    """What a statistic may need to set itself up: the sizes, the training set's size, the network (its block
    names) and the bank size asked for."""

    num_classes: int
    feature_dim: int
    num_samples: int
    backbone: Any = None
    bank_images: int = 50_000


class Statistic:
    """An extra statistic that some scorers need beyond the core ones, accumulated in the same single pass.

    A subclass lives beside the scorers that use it (here when scorers of several files share it), which list the
    class in their ``needs_statistics``; it has a ``name`` (for messages and cache entries) and declares the
    ``fields`` it stores in the statistics (flat keys of the checkpoint). ``update`` sees every batch; ``compute``
    reduces across DDP ranks with ``reduce`` and returns ``{field: value}``; ``core`` holds the core results
    (``counts`` per class, ``n``).
    """

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    needs_logits: ClassVar[bool] = False

    def __init__(self, setup: StatisticsSetup) -> None:
        self.setup = setup

    def blocks(self) -> list[str]:
        """Block outputs (``backbone.blocks()`` / ``stages()`` names) to capture during the pass."""
        return []

    def update(self, batch: StatisticsBatch) -> None:
        raise NotImplementedError

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        raise NotImplementedError


class ClassGaussians:
    """Per-class counts, means and the pooled within-class scatter ``sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` of a
    stream of vectors, in float64, merged batch by batch and across DDP ranks by the pairwise update of Chan, Golub &
    LeVeque (1979): each batch is centred on its own class means and the scatter grows by the batch's scatter plus
    ``n_a n_b / (n_a + n_b) (mu_a - mu_b)(mu_a - mu_b)^T`` per class. Every term is a product of centred values, so a
    direction in which the features do not vary gets a scatter of zero, or of the rounding of the variance itself;
    the textbook ``sum h h^T - N mu mu^T`` leaves there the rounding of the squared means, of either sign.

    Args:
        num_classes: C (1 for the Gaussian of all vectors).
        dim: L.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        f64 = torch.float64
        self.counts = torch.zeros(num_classes, dtype=f64)
        self.means = torch.zeros(num_classes, dim, dtype=f64)
        self.scatter = torch.zeros(dim, dim, dtype=f64)

    def update(self, x: Tensor, labels: Tensor) -> None:
        """Add a batch: vectors ``(B, L)`` (converted to float64 on the CPU) and their classes ``(B,)``."""
        x = x.detach().to("cpu", torch.float64)
        labels = labels.detach().cpu()
        counts = torch.bincount(labels, minlength=len(self.counts)).double()  # (C,)
        sums = torch.zeros_like(self.means).index_add_(0, labels, x)
        means = sums / counts.clamp_min(1)[:, None]  # (C, L); a class absent from the batch: zeros, weight 0
        centred = x - means[labels]  # (B, L)
        self.merge(counts, means, centred.T @ centred)

    def merge(self, counts: Tensor, means: Tensor, scatter: Tensor) -> None:
        """Merge another part's ``(counts (C,), means (C, L), scatter (L, L))`` into this one."""
        total = self.counts + counts
        delta = means - self.means  # (C, L)
        pair = torch.where(total > 0, self.counts * counts / total.clamp_min(1), 0.0)  # (C,)
        self.scatter += scatter + (delta.T * pair) @ delta
        self.means += delta * torch.where(total > 0, counts / total.clamp_min(1), 0.0)[:, None]
        self.counts = total

    def reduce(self, reduce: Reducers) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts (C,), means (C, L), scatter (L, L))`` over every DDP rank (each rank's part gathered and
        merged in rank order; this process's alone in one process)."""
        counts, means = reduce.gather(self.counts[None]), reduce.gather(self.means[None])  # (R, C), (R, C, L)
        scatters = reduce.gather(self.scatter[None])  # (R, L, L)
        merged = ClassGaussians(counts.shape[1], means.shape[2])
        for part in range(len(counts)):
            merged.merge(counts[part], means[part], scatters[part])
        return merged.counts, merged.means, merged.scatter


def between_scatter(counts: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean (L,), sum_c n_c (mu_c - mu)(mu_c - mu)^T (L, L))``: the overall mean and the scatter of the class
    means around it, from centred values."""
    counts = counts.double()
    mean = counts @ means / counts.sum()
    centred = means - mean
    return mean, (centred.T * counts) @ centred


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
        extras: the fields of the extra statistics that were accumulated (``{field: value}``; see the registered
            :class:`Statistic` classes), read as attributes: ``stats.bank``, ``stats.gram``, ... (``None`` when the
            statistic was not accumulated).
        reference: ID image sets measured at run time (kept in memory for the next run, not stored), e.g.
            ``{"id_val": FeatureSet}`` (see :func:`lightning_ood.fitting.reference_images`).
    """

    counts: Tensor
    class_means: Tensor
    mean: Tensor
    std: Tensor
    covariance: Tensor
    activation_quantiles: Tensor
    weights: str = ""
    images: str = ""
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    reference: dict[str, FeatureSet] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:  # an extra's field
        if name.startswith("__") or name in ("extras", "reference"):
            raise AttributeError(name)
        if name in self.extras:
            return self.extras[name]
        raise AttributeError(
            f"these statistics hold no {name!r}: the statistic that stores it was not accumulated (they hold "
            f"{', '.join(sorted(self.extras)) or 'the core fields only'})"
        )

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
    def total_covariance(self) -> Tensor:
        """(L, L) covariance of all training features around their mean (RMDS's class-agnostic Gaussian): the
        within-class covariance plus the class means' scatter around the mean, from centred values."""
        _, between = between_scatter(self.counts, self.class_means.double())
        return self.covariance.double() + between / self.counts.double().sum()

    def moment_around(self, origin: Tensor) -> Tensor:
        """(L, L) mean of ``(h - o)(h - o)^T`` over all training images, for an origin ``o`` (L,): the total
        covariance plus ``(mu - o)(mu - o)^T`` (ViM's second moment around the head's origin)."""
        offset = self.mean.double() - origin.double().to(self.mean.device)
        return self.total_covariance + torch.outer(offset, offset)

    def provides(self, needs: Iterable[type[Statistic]]) -> set[type[Statistic]]:
        """Which of ``needs`` (:class:`Statistic` classes) these statistics lack."""
        return {need for need in needs if any(self.extras.get(f) is None for f in need.fields)}

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

    CORE: ClassVar[tuple[str, ...]] = (
        "counts", "class_means", "mean", "std", "covariance", "activation_quantiles", "weights", "images",
    )  # fmt: skip

    def state_dict(self) -> dict:
        """The core fields and the extras' fields: flat keys, the layout this project's checkpoints have always had
        (earlier versions also stored ``None`` for the extras they did not accumulate)."""
        return {**{name: getattr(self, name) for name in self.CORE}, **self.extras}

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureStatistics:
        required = {"counts", "class_means", "mean", "std", "covariance", "activation_quantiles"}
        missing = required - set(state)
        if missing:
            raise KeyError(f"OOD statistics are missing {sorted(missing)}")
        extras = {k: v for k, v in state.items() if k not in cls.CORE and v is not None}
        if not extras.get("bank_stride"):  # checkpoints of earlier versions store 0 when there is no bank
            extras.pop("bank_stride", None)
        return cls(**{k: state[k] for k in cls.CORE if k in state}, extras=extras)

    @classmethod
    def from_features(
        cls,
        features: Tensor,
        labels: Tensor,
        num_classes: int | None = None,
        head: torch.nn.Module | None = None,
        extras: Iterable[type[Statistic]] = (),
    ) -> FeatureStatistics:
        """Statistics of an in-memory feature matrix ``(N, L)`` with labels ``(N,)``; with the ``head`` also the
        logit-based statistics and a bank of every feature; ``extras``: further statistics, those that features and
        logits determine (one that reads block outputs is left out: it needs the statistics pass)."""
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        setup = StatisticsSetup(num_classes, features.shape[1], len(labels), bank_images=len(labels))
        needs = {*((LogitStatistics, Bank) if head is not None else ()), *extras}
        if head is None:
            needs = {n for n in needs if not n.needs_logits}
        built = {n: st for n, st in build_statistics(needs, setup).items() if type(st).blocks is Statistic.blocks}
        acc = StatisticsAccumulator(num_classes, features.shape[1], extras=built)
        with torch.no_grad():
            logits = head(features) if head is not None else None
        acc.update(features, labels, torch.arange(len(labels)), logits)
        return acc.compute()


def build_statistics(needs: Iterable[type[Statistic]], setup: StatisticsSetup) -> dict[str, Statistic]:
    """The extra statistics ``needs`` (their classes), set up, by name (in name order)."""
    return {cls.name: cls(setup) for cls in sorted(set(needs), key=lambda cls: cls.name)}


class StatisticsAccumulator:
    """Streaming accumulation of :class:`FeatureStatistics` over batches (and, through ``compute``, over ranks).

    Args:
        num_classes: C.
        feature_dim: L.
        quantile_stride: keep the activations of one sample in ``quantile_stride`` (by dataset index) for the
            percentiles; 1 keeps all of them (exact). Use a larger stride when N x L values do not fit in memory.
        extras: the extra statistics to accumulate in the same pass (:func:`build_statistics`).
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        quantile_stride: int = 1,
        extras: Mapping[str, Statistic] | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.quantile_stride = quantile_stride
        self.extras = dict(extras or {})
        self.gaussians = ClassGaussians(num_classes, feature_dim)
        self.kept: list[Tensor] = []

    def blocks(self) -> list[str]:
        """Block outputs the extras read (hooked during the pass)."""
        return list(dict.fromkeys(name for extra in self.extras.values() for name in extra.blocks()))

    def update(
        self,
        features: Tensor,
        labels: Tensor,
        indices: Tensor | None = None,
        logits: Tensor | None = None,
        blocks: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Add a batch: features (B, L), ground-truth labels (B,), dataset indices (B,) for the strides, the head's
        logits (B, C) and the block outputs the extras declared."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape (B, {self.feature_dim}), got {tuple(features.shape)}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
        labels = labels.detach().cpu()
        self.gaussians.update(features, labels)
        if self.quantile_stride > 1 and indices is None:
            raise ValueError("a stride > 1 needs the dataset indices of the batch")
        keep = features.detach().cpu()
        keep = keep if keep.dtype == torch.float64 else keep.float()  # exact percentiles of what the net produced
        if self.quantile_stride > 1:
            keep = keep[indices.cpu() % self.quantile_stride == 0]
        self.kept.append(keep.flatten())
        if not self.extras:
            return
        index = indices.detach().cpu() if indices is not None else torch.arange(len(labels))
        batch = StatisticsBatch(features.detach(), labels, index, logits.detach() if logits is not None else None,
                                blocks or {})  # fmt: skip
        for name, extra in self.extras.items():
            if extra.needs_logits and batch.logits is None:
                raise ValueError(f"the {name!r} statistics need the head's logits")
            extra.update(batch)

    def compute(
        self,
        sum_across: Reduce | None = None,
        gather_across: Reduce | None = None,
        min_across: Reduce | None = None,
        max_across: Reduce | None = None,
    ) -> FeatureStatistics:
        """Finalise; ``sum_across`` / ``gather_across`` / ``min_across`` / ``max_across`` reduce a tensor over DDP
        ranks (identity by default)."""
        reduce = Reducers(sum_across or _identity, gather_across or _identity, min_across or _identity,
                          max_across or _identity)  # fmt: skip
        counts, class_means, scatter = self.gaussians.reduce(reduce)
        n = counts.sum()
        if n == 0:
            raise ValueError("no training features were accumulated")
        if (counts == 0).any():
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"classes {empty} have no training images: their prototypes are undefined")
        mean, between = between_scatter(counts, class_means)
        covariance = scatter / n  # within-class, maximum likelihood
        var = (scatter.diagonal() + between.diagonal()) / n  # per unit, around the overall mean
        values = reduce.gather(torch.cat(self.kept) if self.kept else torch.empty(0))
        extras: dict[str, Any] = {}
        core = {"counts": counts, "n": n}
        for extra in self.extras.values():
            extras.update(extra.compute(core, reduce))
        return FeatureStatistics(
            counts=counts.round().long(),
            class_means=class_means,
            mean=mean,
            std=var.sqrt(),
            covariance=covariance,
            activation_quantiles=percentile(values.double(), QUANTILE_GRID),
            extras=extras,
        )


def quantile_stride(num_samples: int, feature_dim: int, max_values: int) -> int:
    """Smallest stride such that ``num_samples / stride * feature_dim`` activation values fit in ``max_values``."""
    return max(1, math.ceil(num_samples * feature_dim / max_values))


def bank_stride(num_samples: int, bank_images: int) -> int:
    """Smallest stride such that at most about ``bank_images`` training images are in the bank."""
    return max(1, math.ceil(num_samples / max(1, bank_images)))


# ------------------------------------------------------------------------------------------------ shared extras
class Bank(Statistic):
    """``bank``: the features of (a stride of) the training images, float16 (float32 beyond its range), with their
    labels, in dataset-index order whatever the number of ranks; at most about ``bank_images`` of them."""

    name = "bank"
    fields = ("bank", "bank_labels", "bank_stride")

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        self.stride = bank_stride(setup.num_samples, setup.bank_images)
        self.parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (indices, features float32, labels)

    def update(self, batch: StatisticsBatch) -> None:
        chosen = batch.indices % self.stride == 0
        self.parts.append((batch.indices[chosen], batch.features.cpu()[chosen].float(), batch.labels[chosen]))

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        if self.parts:
            indices, bank, labels = (torch.cat(parts) for parts in zip(*self.parts, strict=True))
        else:
            dim = self.setup.feature_dim
            indices, bank, labels = (
                torch.empty(0, dtype=torch.long),
                torch.empty(0, dim),
                torch.empty(0, dtype=torch.long),
            )
        # float16 (half the bytes) unless a feature on some rank is beyond its range (it would become inf)
        largest = float(reduce.max(bank.abs().amax() if len(bank) else torch.tensor(0.0)))
        bank = bank.to(torch.float16 if largest <= torch.finfo(torch.float16).max else torch.float32)
        indices, bank, labels = reduce.gather(indices), reduce.gather(bank), reduce.gather(labels)
        order = indices.argsort()  # the same bank whatever the number of ranks
        return {"bank": bank[order], "bank_labels": labels[order], "bank_stride": self.stride}


class LogitStatistics(Statistic):
    """``logits``: per predicted class, the count and the mean softmax of the training images (KL matching's
    templates); per class, the count and the mean feature of the correctly classified ones (SHE's patterns)."""

    name = "logits"
    fields = ("predicted_counts", "predicted_softmax", "correct_counts", "correct_means")
    needs_logits = True

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        c, f64 = setup.num_classes, torch.float64
        self.predicted_counts = torch.zeros(c, dtype=f64)
        self.predicted_softmax = torch.zeros(c, c, dtype=f64)
        self.correct_counts = torch.zeros(c, dtype=f64)
        self.correct_sums = torch.zeros(c, setup.feature_dim, dtype=f64)

    def update(self, batch: StatisticsBatch) -> None:
        c = self.setup.num_classes
        z = batch.logits.to("cpu", torch.float64)
        h = batch.features.to("cpu", torch.float64)
        predicted = z.argmax(dim=1)
        self.predicted_counts += torch.bincount(predicted, minlength=c).double()
        self.predicted_softmax.index_add_(0, predicted, z.softmax(dim=1))
        right = predicted == batch.labels
        self.correct_counts += torch.bincount(batch.labels[right], minlength=c).double()
        self.correct_sums.index_add_(0, batch.labels[right], h[right])

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Tensor]:
        predicted, correct = reduce.sum(self.predicted_counts), reduce.sum(self.correct_counts)
        return {
            "predicted_counts": predicted.round().long(),
            "predicted_softmax": reduce.sum(self.predicted_softmax) / predicted.clamp_min(1)[:, None],
            "correct_counts": correct.round().long(),
            "correct_means": reduce.sum(self.correct_sums) / correct.clamp_min(1)[:, None],
        }
