"""The evaluation engine, without Lightning: scorer specs -> scorers built, bound and fitted -> one backbone pass per
batch scoring every detector.

    engine = Engine(backbone, scorers=["msp", "energy", "fmls", "knn", "odin"], std=normalization.std)
    engine.fit(accumulate_statistics(backbone, train_loader, engine.needs.statistics))   # once
    logits, scores = engine(images)                                                     # per batch

Data flows one way: backbone -> features (and the block outputs some scorer declared) -> the fitted statistics ->
scores. Every fitted tensor is a buffer of a scorer registered in this module, and the statistics follow the module
too (their own float64 / float16 dtypes kept: they are sums and banks, the scorers cast what they fit to the head's
dtype), so the engine scores on whatever device and in whatever precision the network is: ``.to("cuda")``,
``.double()``, or Lightning placing the :class:`~lightning_ood.module.OODClassifier` that owns it.

The engine names no method: a scorer declares what it reads (:class:`~lightning_ood.scoring.base.Needs`) and
chooses what depends on data in its ``prepare(context)`` hook (:class:`FitContext`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError, FitError
from lightning_ood.features import network_pass
from lightning_ood.hooks import block_outputs
from lightning_ood.normalization import Normalization
from lightning_ood.precision import as_float, network_device, network_dtype
from lightning_ood.scoring import DEFAULT_SCORERS, GROUPS, Scorer, build_scorer
from lightning_ood.scoring.base import Batch, Needs
from lightning_ood.statistics import (
    FeatureSet,
    FeatureStatistics,
    StatisticsAccumulator,
    StatisticsSetup,
    build_statistics,
    quantile_stride,
)

ScorerSpec = str | list[str] | dict[str, dict[str, Any]]
Reduce = Callable[[Tensor], Tensor]
DEFAULT_MAX_ACTIVATIONS = 64_000_000  # activation values kept for exact percentiles (256 MB of float32)
DEFAULT_BANK_IMAGES = 50_000  # training features kept for KNN & co. (all of CIFAR; ImageNet configs take 1%)


def scorer_specs(scorers: ScorerSpec | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Normalise the ``scorers`` argument to ``{label: (registered name, hyperparameters)}``.

    A list names registered scorers with their defaults; a mapping gives each label its hyperparameters, with the
    registered name under ``scorer`` (defaulting to the label): ``{"ours_p30": {"scorer": "fmls", "percentile": 30}}``.
    A group name (``paper``, ``openood``, ``all``), alone or in a list, stands for its scorers.
    """
    if scorers is None:
        scorers = list(DEFAULT_SCORERS)
    if not scorers:
        raise ConfigError(
            f"The scorer set is empty ({scorers!r}): name at least one scorer (e.g. [msp, energy, fmls]) or a group "
            f"({', '.join(sorted(GROUPS))}), or leave scorers unset for every method of the paper's tables."
        )
    if isinstance(scorers, str):
        scorers = [scorers]
    if isinstance(scorers, list | tuple):
        names = [member for name in scorers for member in GROUPS.get(name, [name])]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"Scorers listed twice in {list(scorers)}: {', '.join(twice)}.")
        return {name: (name, {}) for name in names}
    specs = {}
    for label, params in scorers.items():
        params = dict(params or {})
        specs[label] = (params.pop("scorer", label), params)
    return specs


@dataclass
class FitContext:
    """What a scorer's ``prepare`` hook may use to choose a setting from data before it is fitted.

    Attributes:
        backbone: the network.
        training_images: ``(count, seed) -> loader`` of a seeded subset of the ID training images (test transform,
            items ``(image, label, index)``; count ``None``: all of them), or ``None`` when the run has none.
        normalization: the input normalisation of the images.
        sum_across: adds a tensor over DDP ranks (``None``: one process).
        log: where a scorer says what it chose.
        notes: what a scorer measured while choosing (shared between scorers through :meth:`shared`).
        reference_images: ``(reference) -> loader`` of a reference ID image set (``id_val``, ``id_test``: see
            :func:`lightning_ood.fitting.reference_images`; test transform, items ``(image, label, index)``), for
            scorers that fit on those images themselves rather than on their features (AdaSCALE), or ``None``.
    """

    backbone: nn.Module
    training_images: Callable[[int | None, int], Iterable] | None = None
    normalization: Normalization | None = None
    sum_across: Reduce | None = None
    log: Callable[[str], None] = print
    notes: dict[str, Any] = field(default_factory=dict)
    reference_images: Callable[[str], Iterable] | None = None

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per context: two scorers that need the same measurement share it."""
        if key not in self.notes:
            self.notes[key] = compute()
        return self.notes[key]


class Engine(nn.Module):
    """Builds, binds and fits the scorers of ``scorers`` and scores batches in one backbone pass.

    Args:
        backbone: a network with ``features(x) -> (N, L)`` and ``head`` (see :mod:`lightning_ood.models`).
        scorers: registered names, groups or a ``{label: {scorer: name, ...}}`` mapping (:func:`scorer_specs`);
            ``None``: every method of the paper's tables.
        std: the per-channel normalisation std of the inputs (ODIN-type scorers step in pixel units).
        own_backbone: register the backbone as a submodule (a standalone engine: ``engine.to(device)`` moves it);
            ``False`` when the backbone belongs to someone else who moves it (the LightningModule).
    """

    def __init__(
        self,
        backbone: nn.Module,
        scorers: ScorerSpec | None = None,
        std: Sequence[float] | None = None,
        own_backbone: bool = True,
    ) -> None:
        super().__init__()
        if own_backbone:
            self.backbone = backbone
        else:
            object.__setattr__(self, "backbone", backbone)
        self.own_backbone = own_backbone
        self.specs = scorer_specs(scorers)
        self.std = tuple(std) if std is not None else None
        # built now, and bound once to a throwaway copy, so that a bad name, value or block fails at construction,
        # not after a long fit; kept unbound (a bound scorer may hold hooks that cannot be pickled, as ddp_spawn does)
        self.prototypes: dict[str, Scorer] = {
            label: build_scorer(name, **params) for label, (name, params) in self.specs.items()
        }
        for prototype in self.prototypes.values():
            copy.deepcopy(prototype).bind(backbone)
        self.scorers = nn.ModuleDict()
        self.labels: list[str] = []
        self.hooked_blocks: list[str] = []
        self.with_inputs: set[str] = set()
        self._statistics: FeatureStatistics | None = None

    # ---------------------------------------------------------------- what the scorers need
    @property
    def needs(self) -> Needs:
        """What the configured scorers read, combined: the statistics pass accumulates ``needs.statistics``, the
        reference images ``needs.references`` are measured before :meth:`fit`."""
        needs = Needs()
        for prototype in self.prototypes.values():
            needs = needs | prototype.needs
        return needs

    # ---------------------------------------------------------------- statistics, placed with the network
    @property
    def statistics(self) -> FeatureStatistics | None:
        return self._statistics

    @statistics.setter
    def statistics(self, value: FeatureStatistics | None) -> None:
        self._statistics = value.to(network_device(self.backbone)) if value is not None else None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # the fitted scorers' buffers (and the backbone when it is ours)
        if self._statistics is not None:
            device = fn(torch.zeros((), device=self._statistics.device)).device
            self._statistics = self._statistics.to(device)
        return self

    # ---------------------------------------------------------------- fit
    def fit(self, statistics: FeatureStatistics, context: FitContext | None = None) -> Engine:
        """Build, bind, prepare and fit every scorer on ``statistics`` (moved to the network's device first) and
        the network's head. Fitted under ``inference_mode(False)``, so that ODIN-type scorers can use the fitted
        tensors in their autograd pass even when called inside ``torch.inference_mode``."""
        self.statistics = statistics
        head = self.backbone.head
        device = network_device(self.backbone)
        context = context or FitContext(self.backbone)
        fitted: dict[str, Scorer] = {}
        with torch.inference_mode(False):
            for label, (name, params) in self.specs.items():
                try:
                    scorer = build_scorer(name, **params).bind(self.backbone).prepare(context)
                    # anything a scorer fitted on the host (scipy's Weibull fits, numpy percentiles) joins the network
                    fitted[label] = scorer.fit_statistics(self._statistics, head).to(device)
                except FitError as err:  # a degenerate fit is refused, never scored: say which scorer
                    raise FitError(f"{label} cannot be fitted: {err}") from err
        self.labels = list(fitted)
        self.scorers = nn.ModuleDict({module_key(label): scorer for label, scorer in fitted.items()})
        self.hooked_blocks = sorted({block for scorer in fitted.values() for block in scorer.needs.blocks})
        self.with_inputs = {label for label, scorer in fitted.items() if scorer.needs.inputs}
        return self

    def fitted(self) -> dict[str, Scorer]:
        """``{label: scorer}`` in the configured order (after :meth:`fit`)."""
        return {label: self.scorers[module_key(label)] for label in self.labels}

    # ---------------------------------------------------------------- score
    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits ``(N, C)`` and every scorer's scores ``{label: (N,)}`` for a batch of normalised images, in one
        backbone pass (the ODIN-type scorers run theirs on perturbed inputs). In the network's own precision (at
        least float32), also under a mixed-precision autocast: scores are compared to published ones."""
        backbone = self.backbone
        if not self.labels and self.specs:
            raise RuntimeError("The engine is not fitted: call fit(statistics) first.")
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(network_dtype(backbone))
            with torch.no_grad(), block_outputs(backbone, self.hooked_blocks) as blocks:
                features = as_float(backbone.features(x))
                logits = as_float(backbone.head(features.to(x.dtype)))
            batch = Batch(features, logits, blocks, inputs=x, features_of=backbone.features, std=self.std)
            scores = {}
            for label, scorer in self.fitted().items():
                if label in self.with_inputs:
                    scores[label] = scorer(batch)
                else:
                    with torch.no_grad():
                        scores[label] = scorer(batch)
        return logits, scores

    def score_cached(self, data: FeatureSet) -> dict[str, Tensor]:
        """Every scorer's scores of cached features and logits (``tune``, ``sweep``: no pass over the images); for
        scorers that read nothing but features and logits."""
        unsupported = [label for label, s in self.fitted().items() if s.needs.blocks or s.needs.inputs]
        if unsupported:
            raise ConfigError(
                f"{', '.join(unsupported)} read block outputs or the inputs: cached features cannot serve."
            )
        batch = Batch(data.features, data.logits)
        with torch.no_grad():
            return {label: scorer(batch) for label, scorer in self.fitted().items()}


class HeadOnly(nn.Module):
    """The network of cached features: its head alone (what scorers fit on besides the statistics)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


def cached_engine(head: nn.Module, scorers: ScorerSpec, statistics: FeatureStatistics) -> Engine:
    """An engine fitted on ``statistics`` and ``head`` for scoring cached features (:meth:`Engine.score_cached`)."""
    return Engine(HeadOnly(head), scorers).fit(statistics)


def module_key(label: str) -> str:
    return label.replace(".", "_")  # ModuleDict keys cannot contain dots


# ------------------------------------------------------------------------------------------------ statistics pass
@torch.inference_mode(False)  # statistics must stay usable in autograd (ODIN) even when called in inference mode
@torch.no_grad()
def accumulate_statistics(
    backbone: nn.Module,
    loader: Iterable,
    needs: Iterable[str] = frozenset(),
    bank_images: int = DEFAULT_BANK_IMAGES,
    max_activations: int = DEFAULT_MAX_ACTIVATIONS,
    reducers: tuple[Reduce | None, Reduce | None, Reduce | None, Reduce | None] = (None, None, None, None),
    num_samples: int | None = None,
    progress: bool = True,
) -> FeatureStatistics:
    """The statistics pass: one :func:`network_pass` over ``loader`` (items ``(image, label, index)``, the training
    images with the test transform), accumulating the core statistics and the extras in ``needs`` (``bank``: at
    most about ``bank_images`` features; ``stages``; ``gram``; see :mod:`lightning_ood.statistics`).

    ``reducers``: sum, gather, min and max across DDP ranks (identity in one process); ``num_samples``: the number
    of training images (default ``len(loader.dataset)``), which sets the strides by dataset index, so that the
    result is the same whatever the batching and the number of ranks."""
    num_samples = num_samples if num_samples is not None else len(loader.dataset)  # type: ignore[attr-defined]
    stride = quantile_stride(num_samples, backbone.feature_dim, max_activations)
    setup = StatisticsSetup(backbone.num_classes, backbone.feature_dim, num_samples, backbone, bank_images)
    acc = StatisticsAccumulator(backbone.num_classes, backbone.feature_dim, stride, build_statistics(needs, setup))
    passes = network_pass(backbone, loader, acc.blocks(), "Fitting OOD statistics on the training set", progress,
                          subject="training images")  # fmt: skip
    for features, logits, blocks, (_, labels, indices) in passes:
        acc.update(features, labels, indices, logits, blocks)
    return acc.compute(*reducers)
