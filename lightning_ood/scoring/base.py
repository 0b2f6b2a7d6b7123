"""The scorer contract: one call, ``scorer(batch) -> (N,)`` scores, higher = more in-distribution.

A scorer is a small ``nn.Module``. It declares what it reads in one place (:attr:`Scorer.needs`: block outputs,
the input images, statistics beyond the core ones, reference images), is fitted once (``fit_statistics(stats,
head)``) and then scores a :class:`Batch`, the one view of a batch every scorer gets from the evaluation engine.
Every tensor it fits is a buffer (assigning a tensor attribute registers it), so it moves with the model it belongs
to (``.to(device)``, ``.double()``, Lightning's placement) and nothing is moved by hand. The buffers are not
persistent: checkpoints store the statistics, and a scorer is fitted from them again.

Feature scorers implement ``score(features, logits)``, the pure form their tests call; scorers that read block
outputs or the inputs override ``forward(batch)``.

Scores are at least float32, and a scorer that computes in float64 returns float64: rounding such a score to float32
would tie images it tells apart (a distance of 1,000 that differs in its 9th digit), and ties change AUROC and FPR.
Softmax scores are computed in a form that keeps their order where the probability itself rounds to 1.0
(:func:`log_max_softmax`, :func:`exact_log_softmax`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.checks import (  # noqa: F401  (what the scorers check their hyperparameters with)
    check_count,
    check_nonnegative,
    check_number,
    check_percentile,
    check_positive,
    check_seed,
)
from lightning_ood.errors import ConfigError
from lightning_ood.precision import as_float
from lightning_ood.statistics import FeatureStatistics, Statistic

__all__ = [
    "Batch",
    "FittedTensors",
    "FittedTuple",
    "LogitScorer",
    "Needs",
    "Scorer",
    "Tuning",
    "as_float",
    "energy",
    "exact_log_softmax",
    "log_max_softmax",
    "log_rest_softmax",
]

try:  # Python 3.11+
    from typing import Self
except ImportError:  # pragma: no cover
    from typing_extensions import Self


@dataclass(frozen=True)
class Needs:
    """What a scorer reads beyond the penultimate features and the logits.

    Attributes:
        blocks: block outputs (names of the network's modules, ``<module>:input`` for a module's input) captured by
            forward hooks during the one backbone pass.
        inputs: the input images and a way to run the network again on perturbed ones (ODIN-type methods; they
            need input gradients).
        statistics: extras of the statistics pass beyond the core ones (:class:`~lightning_ood.statistics.Statistic`
            classes: ``Bank``, ``LogitStatistics``, ``StageGaussians``, ...).
        references: ID image sets other than the training images the scorer fits on (``id_val``, ``id_test``).
    """

    blocks: tuple[str, ...] = ()
    inputs: bool = False
    statistics: frozenset[type[Statistic]] = frozenset()
    references: frozenset[str] = frozenset()

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            blocks=tuple(dict.fromkeys((*self.blocks, *other.blocks))),
            inputs=self.inputs or other.inputs,
            statistics=self.statistics | other.statistics,
            references=self.references | other.references,
        )


@dataclass(frozen=True)
class Tuning:
    """How ``lightning-ood tune`` and ``sweep`` treat a scorer, declared by its class beside its ``search_space``.

    ``tune`` scores every setting of the grid (the ``search_space``, or the user's ``--grid``) on ID validation images
    against validation OOD images; the lowest FPR95 wins, then the highest AUROC, then ``prefer``, then the first in
    grid order. ``sweep`` draws FPR95 and AUROC over each key of ``sweep`` for every OOD set.

    Attributes:
        prefer: the tie-break after FPR95 and AUROC, ``(hyperparameter, "high" | "low")`` in order (the paper's
            Section V-F: the largest lambda, then the smallest p).
        of_activations: grid keys whose values are percentiles of the training activations, and the hyperparameter
            each sets (``{"clip_percentile": "clip"}``): the setting is scored, and written, with the absolute value.
        family: the choice applies to every configured scorer of the same class (the method's registered variants:
            ``react_fm``, ``msp_fmls``, ``odin_fmls``, ...), except a hyperparameter a variant fixes to ``None``.
        prepared: hyperparameters the scorer chooses itself from the ID training images in ``prepare`` (FeatureNorm's
            block, by NormRatio): ``tune`` runs that and writes its choice, with what it measured
            (``scorer.preparation``: ``name``, ``table()``, ``to_csv()``, ``figure()``); no grid.
        sweep: grid key -> the values ``sweep`` runs over (keys as in the grid; the paper's Figures 6 and 7).
    """

    prefer: tuple[tuple[str, str], ...] = ()
    of_activations: Mapping[str, str] = field(default_factory=dict)
    family: bool = False
    prepared: tuple[str, ...] = ()
    sweep: Mapping[str, tuple] = field(default_factory=dict)

    def sweeps(self, key: str) -> bool:
        """Whether ``sweep`` may run over ``key``: a declared sweep, or the absolute values of a hyperparameter whose
        declared sweep is in activation percentiles (``clip`` for ``clip_percentile``)."""
        return key in self.sweep or any(t == key and s in self.sweep for s, t in self.of_activations.items())


@dataclass
class Batch:
    """The one view of a batch that every scorer gets.

    Attributes:
        features: (N, L) penultimate features h(x).
        logits: (N, C) the head's logits.
        blocks: block outputs of the same forward pass, for the names some scorer declared (:attr:`Needs.blocks`).
        inputs: (N, 3, H, W) the normalised input images (``None`` when scoring cached features).
        features_of: the network from inputs to penultimate features, to run again on perturbed inputs.
        std: the per-channel normalisation std of the inputs (ODIN divides its gradient step by it).
    """

    features: Tensor
    logits: Tensor
    blocks: Mapping[str, Tensor] = field(default_factory=dict)
    inputs: Tensor | None = None
    features_of: Callable[[Tensor], Tensor] | None = None
    std: Sequence[float] | None = None


class FittedTensors(nn.Module):
    """Fitted tensors keyed by name (block names hold dots, which buffer names cannot), a tuple of tensors per name,
    held as non-persistent buffers so that they move with the scorer that owns them."""

    def __init__(self, groups: Mapping[str, Sequence[Tensor]]) -> None:
        super().__init__()
        self.names = list(groups)
        self.sizes = [len(groups[name]) for name in self.names]
        for i, name in enumerate(self.names):
            for j, tensor in enumerate(groups[name]):
                self.register_buffer(f"t{i}_{j}", tensor, persistent=False)

    def __getitem__(self, name: str) -> tuple[Tensor, ...]:
        i = self.names.index(name)
        return tuple(getattr(self, f"t{i}_{j}") for j in range(self.sizes[i]))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def items(self):
        return [(name, self[name]) for name in self.names]


class FittedTuple(nn.Module):
    """A tuple of fitted tensors (``a, b = scorer.terms``) held as non-persistent buffers, so that they move with the
    scorer; a scorer's tuple attribute of tensors becomes one by assignment."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        super().__init__()
        self.size = len(tensors)
        for i, tensor in enumerate(tensors):
            self.register_buffer(f"t{i}", tensor, persistent=False)

    def __getitem__(self, index: int) -> Tensor:
        if not -self.size <= index < self.size:
            raise IndexError(index)
        return getattr(self, f"t{index % self.size}")

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return (self[i] for i in range(self.size))


class Scorer(nn.Module):
    """Base class. Feature scorers implement :meth:`fit_statistics` (when they fit anything) and :meth:`score`;
    scorers that read more override :meth:`forward` and declare it in :attr:`needs`.

    Class attributes (the declarations :attr:`needs` reads):
        needs_inputs: the scorer perturbs the input images (see :class:`~lightning_ood.scoring.odin.ODIN`).
        needs_statistics: statistics beyond the core ones that the statistics pass must accumulate for it (the
            :class:`~lightning_ood.statistics.Statistic` classes).
        search_space: the hyperparameter grid ``lightning-ood tune`` searches for this scorer (its authors' grid).
        tuning: the rest of how ``tune`` and ``sweep`` treat it (:class:`Tuning`).
    """

    needs_inputs: ClassVar[bool] = False
    needs_statistics: ClassVar[frozenset[type[Statistic]]] = frozenset()
    search_space: ClassVar[dict[str, tuple]] = {}
    tuning: ClassVar[Tuning] = Tuning()
    preparation: Any = None  # what prepare() measured to choose a setting (a table, CSV and figure; see Tuning)

    def __setattr__(self, name: str, value: Any) -> None:
        # A fitted tensor is a (non-persistent) buffer, so that it follows the module's device and dtype; a network
        # part a scorer reads (a BatchNorm of the backbone) stays a plain reference, never a submodule: it belongs to
        # the backbone, which moves it, and the scorer must not add its parameters to anyone's state.
        if isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
            value = FittedTuple(value)
        if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) and "_buffers" in self.__dict__:
            if name not in self._buffers:
                self.__dict__.pop(name, None)
                self.register_buffer(name, value, persistent=False)
                return
        elif isinstance(value, nn.Module) and not isinstance(value, Scorer | FittedTensors | FittedTuple):
            self._modules.pop(name, None)
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    @property
    def needs_blocks(self) -> tuple[str, ...]:
        """Block outputs this scorer reads (after :meth:`bind`)."""
        return ()

    @property
    def references(self) -> set[str]:
        """ID image sets other than the training set the scorer fits on (``id_val``, ``id_test``)."""
        reference = getattr(self, "reference", "train")
        return set() if reference == "train" else {reference}

    @property
    def needs(self) -> Needs:
        """Everything the scorer reads beyond features and logits, in one place (composed scorers combine theirs)."""
        return Needs(
            blocks=tuple(self.needs_blocks),
            inputs=type(self).needs_inputs,
            statistics=frozenset(type(self).needs_statistics),
            references=frozenset(self.references),
        )

    def bind(self, backbone: nn.Module) -> Self:
        """Give the scorer the network, for methods that read more than the features and the head (BATS reads its
        last BatchNorm); called before fitting. Most scorers need nothing."""
        return self

    def prepare(self, context: Any) -> Self:
        """Choose what depends on data before fitting (FeatureNorm's block by NormRatio), through ``context``
        (:class:`lightning_ood.engine.FitContext`). Most scorers need nothing."""
        return self

    def fit(self, features: Tensor, labels: Tensor, head: nn.Linear) -> Self:
        """Fit on training features ``(N, L)``, their ground-truth labels ``(N,)`` and the classifier head."""
        stats = FeatureStatistics.from_features(features, labels, head.out_features, head, self.needs.statistics)
        return self.fit_statistics(stats, head)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> Self:
        """Fit from precomputed :class:`FeatureStatistics` (what the evaluation engine does)."""
        self.weight = head.weight.detach().clone()  # (C, L)
        self.bias = head.bias.detach().clone() if head.bias is not None else head.weight.new_zeros(head.out_features)
        return self

    def forward(self, batch: Batch) -> Tensor:  # -> (N,)
        return self.score(batch.features, batch.logits)

    def score(self, features: Tensor, logits: Tensor) -> Tensor:  # (N, L), (N, C) -> (N,)
        raise NotImplementedError(
            f"{type(self).__name__} reads more than features and logits ({self.needs}): call it on a Batch."
        )

    def head_logits(self, features: Tensor) -> Tensor:  # (N, L) -> (N, C)
        return torch.addmm(self.bias.to(features.dtype), features, self.weight.T.to(features.dtype))

    def extra_repr(self) -> str:
        plain = str | int | float | bool | tuple | type(None)
        params = {k: v for k, v in vars(self).items() if k[0] != "_" and k != "training" and isinstance(v, plain)}
        return ", ".join(f"{k}={v!r}" for k, v in params.items())


class OwnPass:
    """What a scorer that runs the network over images when it is fitted (NAC, the Mahalanobis paper's regression,
    AdaSCALE) keeps between ``prepare`` and ``fit_statistics``: the run's :class:`~lightning_ood.engine.FitContext`,
    taken once, so that neither the images nor the data module behind them stay with the fitted scorer. Its batches
    go through :func:`lightning_ood.features.network_batches`, the one loop that runs a network over a loader."""

    def __init__(self, scorer: str, images_for: str) -> None:
        self.scorer, self.images_for = scorer, images_for
        self.context: Any = None

    def keep(self, context: Any, source: str = "training_images") -> None:
        """Keep ``context``, or refuse when it has no ``source`` images (``training_images`` / ``reference_images``)."""
        if context is None or getattr(context, source, None) is None:
            raise ConfigError(
                f"{self.scorer} {self.images_for}, which this run does not have (an evaluation engine fitted without "
                f"a FitContext of those images)."
            )
        self.context = context

    def take(self) -> Any:
        """The kept context, once: ``prepare(context)`` must have run."""
        if self.context is None:
            raise ConfigError(f"{self.scorer} {self.images_for}: call prepare(context) first.")
        context, self.context = self.context, None
        return context


# ------------------------------------------------------------------------------------------------ score functions


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:  # (N, C) -> (N,)
    """Negative free energy ``T * logsumexp(f / T)`` (Liu et al., 2020)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def exact_log_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:  # (N, C) -> (N, C) float64
    """``log softmax(f / T)`` in float64 with the log-sum-exp taken as ``max + log1p(sum of the others' exp(f - max))``,
    so that ``log p`` of a confident prediction keeps its value ``-log1p(...)`` down to 1e-308 instead of rounding to 0
    (``torch.log_softmax`` loses everything below float64's eps, 2e-16; a float32 softmax rounds ``p`` to exactly 1.0
    once the others' share is below 6e-8, a logit gap of about 17)."""
    z = logits.double() / temperature
    top, top_index = z.max(dim=1, keepdim=True)
    others = (z - top).exp().scatter(1, top_index, 0.0).sum(dim=1, keepdim=True)  # (N, 1): sum over j != argmax
    return z - top - torch.log1p(others)


def log_max_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:  # (N, C) -> (N,) float64
    """The maximum softmax probability (Hendrycks & Gimpel, 2017; ``temperature`` as in ODIN) as its logarithm
    ``log p_max = -log1p(sum_{j != c} exp((f_j - f_c) / T))``, in float64: strictly increasing in ``p_max``, so every
    AUROC and FPR is MSP's, without the ties of ``p_max`` rounded to 1.0 (see :func:`exact_log_softmax`)."""
    return exact_log_softmax(logits, temperature).amax(dim=1)


def log_rest_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:  # (N, C) -> (N,) float64
    """``log(1 - p_max)``, the log of the other classes' share, as the log-sum-exp of their ``log p``: exact however
    confident the prediction (no ``1 - p`` is formed)."""
    log_p = exact_log_softmax(logits, temperature)
    top = log_p.argmax(dim=1, keepdim=True)
    return torch.logsumexp(log_p.scatter(1, top, float("-inf")), dim=1)


def one_minus_softmax(log_p: Tensor) -> Tensor:
    """``1 - p`` from ``log p`` (:func:`exact_log_softmax`), exact for ``p`` near 1 (``-expm1(log p)``)."""
    return -torch.expm1(log_p)


OUTPUTS = {"energy": energy, "msp": log_max_softmax}


def check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise ConfigError(f"Unknown score output {output!r}. Choose one of: {', '.join(OUTPUTS)}.")
    return output


REFERENCES = ("train", "id_val", "id_test")


def check_reference(reference: str, allowed: tuple[str, ...] = REFERENCES) -> str:
    """``train``: the training images (the statistics); ``id_val``: held-out ID images that are never scored (the
    ``data.val_split`` images, else 2,000 seeded training images); ``id_test``: 2,000 seeded ID test images, which
    are also scored (test-set leakage, ReAct's authors' convention; the results flag it). See
    :func:`lightning_ood.fitting.reference_images`."""
    if reference not in allowed:
        raise ConfigError(f"reference must be one of {', '.join(allowed)}, got {reference!r}.")
    return reference


def reference_set(stats: FeatureStatistics, reference: str):
    """The :class:`~lightning_ood.statistics.ReferenceSet` of ``reference`` measured for this run."""
    if reference not in stats.reference:
        raise ConfigError(f"no {reference!r} reference images were measured for these statistics")
    return stats.reference[reference]


def softmax_entropy(logits: Tensor) -> Tensor:  # (N, C) -> (N,) float64: sum p log p (the negative entropy)
    log_p = exact_log_softmax(logits)
    return (log_p.exp() * log_p).sum(dim=1)


class LogitScorer(Scorer):
    """A scorer that turns (possibly modified) logits into a score with ``output`` (energy or MSP).

    Subclasses override :meth:`logits`; ODIN reuses it for its perturbation pass, so any logit-modifying method
    combines with ODIN.
    """

    def __init__(self, output: str = "energy") -> None:
        super().__init__()
        self.output = check_output(output)

    def logits(self, features: Tensor, logits: Tensor) -> Tensor:  # (N, L), (N, C) -> (N, C)
        return logits

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        return OUTPUTS[self.output](self.logits(features, logits))
