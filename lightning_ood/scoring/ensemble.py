"""Mahalanobis on Lee et al.'s layers with their input pre-processing (Lee et al., NeurIPS 2018), in two forms:

- ``mds_ensemble``: OpenOOD's layer ensemble, the per-layer scores summed with fixed weights;
- ``mahalanobis_paper``: the paper's Table I row as its code computes it (sunzh18/HIMPLoS ``utils/mahalanobis_lib.py``
  and ``ood_eval.py``), a logistic regression over the per-layer scores, fitted on ID images against FGSM images,
  with the noise magnitude chosen on a second set of both.

The layers are Lee et al.'s ``feature_list`` (``backbone.stages()``): for a DenseNet the stem convolution, the
transition outputs and ``relu(bn(last block))``; for a ResNet the stem and every stage. Each layer's channel means get
class means and one shared covariance from the training images (the statistics' ``stages``). At test time, per layer,
the input moves by ``epsilon`` against the sign of the gradient of its squared distance to the closest class mean,
and the layer's score is minus the closest squared distance of the moved input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.features import network_batches
from lightning_ood.hooks import block_outputs
from lightning_ood.metrics import fpr_at_tpr
from lightning_ood.precision import device_constant, network_device
from lightning_ood.scoring.base import (
    Batch,
    FittedTensors,
    OwnPass,
    Scorer,
    check_nonnegative,
    check_positive,
    check_seed,
)
from lightning_ood.scoring.mahalanobis import mahalanobis_terms, squared_distances
from lightning_ood.statistics import (
    ClassGaussians,
    FeatureStatistics,
    Reducers,
    Statistic,
    StatisticsBatch,
    StatisticsSetup,
)


class StageGaussians(Statistic):
    """``stages``: per layer of Lee et al.'s ``feature_list`` (``backbone.stages()``), the class means and the shared
    covariance of its channel means (their layer ensemble)."""

    name = "stages"
    fields = ("stages",)

    def __init__(self, setup: StatisticsSetup) -> None:
        super().__init__(setup)
        self.names = list(setup.backbone.stages()) if setup.backbone is not None else []
        self.gaussians: dict[str, ClassGaussians] = {}

    def blocks(self) -> list[str]:
        return self.names

    def update(self, batch: StatisticsBatch) -> None:
        for name in self.names:
            out = batch.blocks[name]
            pooled = out.flatten(2).mean(dim=2) if out.ndim == 4 else out.mean(dim=1)
            if name not in self.gaussians:
                self.gaussians[name] = ClassGaussians(self.setup.num_classes, pooled.shape[1])
            self.gaussians[name].update(pooled, batch.labels)  # (B, S)

    def compute(self, core: dict[str, Tensor], reduce: Reducers) -> dict[str, Any]:
        stages = {}
        for name in self.names:
            counts, means, scatter = self.gaussians[name].reduce(reduce)
            stages[name] = {"counts": counts.round().long(), "class_means": means, "covariance": scatter / counts.sum()}
        return {"stages": stages}


Features = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------ per-layer distances
def closest_distances(
    backbone: nn.Module, terms: FittedTensors, names: Sequence[str], x: Tensor, features_fn: Features
) -> list[Tensor]:
    """Per layer, the (N,) squared distance of its channel means to the closest class mean, from one forward pass
    that stops at the last of ``names`` (in forward order), as the authors' ``intermediate_forward`` does."""
    with block_outputs(backbone, names) as captured, stop_after(backbone, names[-1]):
        features_fn(x)
    distances = []
    for name in names:
        out = captured[name]
        pooled = out.flatten(2).mean(dim=2) if out.ndim == 4 else out.mean(dim=1)  # (N, C) channel means
        distances.append(squared_distances(pooled.double(), *terms[name]).min(dim=1).values)
    return distances


class LayerReached(Exception):
    """Ends a forward pass once the last layer a scorer reads is computed (raised by :func:`stop_after`'s hook)."""


@contextmanager
def stop_after(backbone: nn.Module, name: str):
    """Within the ``with`` body, a forward pass ends right after ``name`` (a block, a module, or ``"<module>:input"``)
    is computed, with the body (its :class:`LayerReached` is caught here); hooks registered earlier on it
    (:func:`block_outputs`) still run first."""

    def stop(*_) -> None:
        raise LayerReached

    blocks = backbone.blocks()
    if name in blocks:
        handle = blocks[name].register_forward_hook(stop)
    elif name.endswith(":input"):
        handle = backbone.get_submodule(name.removesuffix(":input")).register_forward_pre_hook(stop)
    else:
        handle = backbone.get_submodule(name).register_forward_hook(stop)
    try:
        yield
    except LayerReached:
        pass
    finally:
        handle.remove()


def descent_signs(
    backbone: nn.Module, terms: FittedTensors, names: Sequence[str], x: Tensor, features_fn: Features
) -> list[Tensor]:
    """Per layer, the sign of the input gradient of its closest squared distance (+1 where the gradient is 0, as
    ``torch.ge(grad, 0)`` of the authors' code): one forward pass, one backward pass per layer."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        distances = closest_distances(backbone, terms, names, x, features_fn)
        last = len(names) - 1
        grads = [torch.autograd.grad(d.sum(), x, retain_graph=i < last)[0] for i, d in enumerate(distances)]
    return [torch.where(g >= 0, 1.0, -1.0).to(x.dtype) for g in grads]


@torch.no_grad()
def moved_distances(
    backbone: nn.Module,
    terms: FittedTensors,
    names: Sequence[str],
    x: Tensor,
    features_fn: Features,
    signs: Sequence[Tensor],
    epsilon: float,
    step_scale: Tensor | None = None,
) -> Tensor:  # -> (N, K)
    """Per layer, the closest squared distance after the input moved by ``epsilon`` against that layer's gradient
    sign (divided by ``step_scale``, the normalisation std, when given): one forward pass per layer (one in all
    when ``epsilon`` is 0)."""
    x = x.detach()
    if not epsilon:
        return torch.stack(closest_distances(backbone, terms, names, x, features_fn), dim=1)
    columns = []
    for name, sign in zip(names, signs, strict=True):
        step = sign if step_scale is None else sign / step_scale
        columns.append(closest_distances(backbone, terms, [name], x - epsilon * step, features_fn)[0])
    return torch.stack(columns, dim=1)


def stage_terms(stats: FeatureStatistics, names: Sequence[str], scorer: str) -> FittedTensors:
    """The class means and precision of each layer, from the statistics' ``stages``."""
    missing = [name for name in names if name not in stats.stages]
    if missing:
        raise ConfigError(
            f"{scorer}: the statistics hold no Gaussians for the layers {missing} (they hold {list(stats.stages)}): "
            f"they were fitted for other layers by an earlier version. Fit the statistics again: delete the "
            f"'ood_statistics_*stages*' entries of model.statistics_cache, or the checkpoint's statistics."
        )
    stages = stats.stages
    return FittedTensors({name: mahalanobis_terms(stages[name]["class_means"], stages[name]["covariance"],
                                                  stages[name]["counts"]) for name in names})  # fmt: skip


def lee_layers(backbone: nn.Module, scorer: str) -> list[str]:
    names = list(backbone.stages())
    if not names:
        raise ConfigError(f"{scorer} reads Lee et al.'s layers (stages()), and {type(backbone).__name__} lists none.")
    return names


def check_input_batch(batch: Batch, scorer: str) -> tuple[Tensor, Features]:
    if batch.inputs is None or batch.features_of is None:
        raise ValueError(f"{scorer} perturbs the input images: its Batch needs inputs and features_of")
    return batch.inputs, batch.features_of


# ------------------------------------------------------------------------------------------------ mds_ensemble
class MahalanobisEnsemble(Scorer):
    """``score = -sum_l w_l d_l(x - epsilon * sign(grad d_l) / std)`` over Lee et al.'s layers, ``d_l`` the closest
    squared distance of layer ``l``. Costs one forward pass, one backward pass per layer and one forward pass per
    layer per image, on top of the engine's pass; every pass ends at the layer it reads (DenseNet-BC-100: about 7
    full forward passes in all).

    Args:
        epsilon: the input perturbation (0.0014, OpenOOD; Lee et al. choose among 0 ... 0.2 on validation data).
        weights: one weight per layer; ``None`` weighs them equally. (Lee et al. fit the weights by logistic regression
            on validation OOD data, which a post-hoc benchmark without OOD validation data cannot; equal weights are the
            usual substitute. ``mahalanobis_paper`` fits them on FGSM images, as the paper's code does.)
        scale_by_std: divide the gradient sign by the per-channel normalisation std (pixel-space steps, as Lee et al.'s
            ``lib_generation.py`` and ODIN).
    """

    needs_inputs = True
    needs_statistics = frozenset({StageGaussians})
    search_space: ClassVar[dict[str, tuple]] = {"epsilon": (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)}

    def __init__(self, epsilon: float = 0.0014, weights: Sequence[float] | None = None, scale_by_std: bool = True):
        super().__init__()
        check_nonnegative("epsilon", epsilon)
        self.epsilon = epsilon
        self.weights = tuple(weights) if weights is not None else None
        self.scale_by_std = scale_by_std
        self.backbone: nn.Module | None = None

    def bind(self, backbone: nn.Module) -> MahalanobisEnsemble:
        self.stage_names = lee_layers(backbone, "mds_ensemble")
        if self.weights is not None and len(self.weights) != len(self.stage_names):
            raise ConfigError(f"mds_ensemble: {len(self.weights)} weights for {len(self.stage_names)} layers.")
        self.backbone = backbone
        return self

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> MahalanobisEnsemble:
        super().fit_statistics(stats, head)
        if self.backbone is None:
            raise ConfigError("mds_ensemble needs the network: call bind(backbone).")
        self.terms = stage_terms(stats, self.stage_names, "mds_ensemble")
        return self

    def forward(self, batch: Batch) -> Tensor:
        inputs, features_fn = check_input_batch(batch, "mds_ensemble")
        scale = None
        if self.epsilon and self.scale_by_std:
            if batch.std is None:
                raise ValueError("mds_ensemble with scale_by_std=True needs the normalisation std")
            scale = device_constant(batch.std, inputs.dtype, inputs.device).view(1, -1, 1, 1)
        names = self.stage_names
        signs = descent_signs(self.backbone, self.terms, names, inputs, features_fn) if self.epsilon else []
        distances = moved_distances(self.backbone, self.terms, names, inputs, features_fn, signs, self.epsilon, scale)
        weights = device_constant(self.weights or (1.0,) * len(names), torch.float64, inputs.device)
        return -(distances @ weights)


# ------------------------------------------------------------------------------------------------ mahalanobis_paper
PAPER_MAGNITUDES = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)  # the authors' list, in their order
LOGISTIC_CS = tuple(np.logspace(-4, 4, 10).tolist())  # sklearn's LogisticRegressionCV(Cs=10)


class MahalanobisPaper(Scorer):
    """The paper's "Mahalanobis" (Table I), as its code computes it: Lee et al.'s per-layer confidences combined by a
    logistic regression fitted on ID images against FGSM images, with a tuned noise magnitude.

    Per layer ``l`` (``backbone.stages()``, Lee et al.'s layers), the confidence is ``s_l = -d_l(x') / 2`` with
    ``x' = x - magnitude * sign(grad d_l)`` (the sign not divided by the std, unlike in Lee et al.'s code and
    ``mds_ensemble``: HIMPLoS ``utils/mahalanobis_lib.py``, ``get_Mahalanobis_score``), and the score is
    ``-sigmoid(w . s + b)``, minus the regression's probability of "adversarial" (``-regressor.predict_proba(s)[:, 1]``
    of ``utils/cal_score.py``).

    Fitting, as the authors' ``tune_mahalanobis_hyperparams`` (sunzh18/ood_benchmark ``utils/mahalanobis_lib.py``,
    which writes the files HIMPLoS's ``ood_eval.py`` reads), on ``images`` ID images split in two halves:
    each image gets an FGSM twin ``clamp(x + adversarial_noise * sign(grad CE(f(x), y)), 0, 1)`` (the clamp acts on
    the normalised images, as in their code); for each magnitude of ``magnitudes``, an L2 logistic regression
    (:func:`logistic_regression_cv`, sklearn's ``LogisticRegressionCV()``) is fitted on the first half (ID 0, FGSM 1)
    and scored on the second half; the magnitude with the lowest FPR at 95% TPR there (their ``get_measures``: the
    ROC point closest to 95%), the first on ties, is kept with its regression.

    Differs from the authors' in the images: they take the first 1,000 ID *test* images (precompute.py's
    ``val_loader`` is the CIFAR test set), which the test then scores; here a seeded subset of ``images`` ID
    *training* images (test transform: the images of the class means, never the test images), so nothing scored is
    fitted on. And the regression is solved to convergence (sklearn's lbfgs stops at tol 1e-4 or 100 iterations).

    Cost per test image, on top of the engine's pass: one forward pass, one backward pass per layer and one forward
    pass per layer, each ending at the layer it reads, as the authors' ``intermediate_forward`` (DenseNet-BC-100, 4
    layers: about 7 full forward passes). Fitting, once per run: an FGSM forward and backward pass per ID image, then
    for each of the ``2 * images`` clean and FGSM images the same gradient passes and one forward pass per layer per
    nonzero magnitude (6 for the authors' list): about 40,000 full forward passes of DenseNet-BC-100 for the
    default 1,000 images.

    Args:
        magnitudes: the noise magnitudes to choose from (the authors' list); one value fixes it.
        images: ID training images to fit on: half for the regression, half to choose the magnitude (the authors:
            1,000).
        adversarial_noise: the FGSM step in normalised input units (0.05, the authors').
        seed: the seed of the training-image subset.
    """

    needs_inputs = True
    needs_statistics = frozenset({StageGaussians})

    def __init__(
        self,
        magnitudes: Sequence[float] = PAPER_MAGNITUDES,
        images: int = 1000,
        adversarial_noise: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.magnitudes = tuple(float(m) for m in magnitudes)
        if not self.magnitudes:
            raise ConfigError("mahalanobis_paper: magnitudes is empty; give at least one (the authors': 0 ... 0.01).")
        for magnitude in self.magnitudes:
            check_nonnegative("magnitudes", magnitude)
        if isinstance(images, bool) or not isinstance(images, int) or images < 20:
            raise ConfigError(f"mahalanobis_paper: images must be an integer >= 20 (5-fold halves), got {images!r}.")
        check_positive("adversarial_noise", adversarial_noise)
        self.images = images
        self.adversarial_noise = adversarial_noise
        self.seed = check_seed("seed", seed)
        self.backbone: nn.Module | None = None
        self.own_pass = OwnPass(
            "mahalanobis_paper", "fits its logistic regression on ID training images and their FGSM twins"
        )
        self.magnitude: float | None = None

    def bind(self, backbone: nn.Module) -> MahalanobisPaper:
        self.stage_names = lee_layers(backbone, "mahalanobis_paper")
        self.backbone = backbone
        return self

    def prepare(self, context) -> MahalanobisPaper:
        """Keep the run's ID training images: the regression is fitted on them once the Gaussians are known."""
        self.own_pass.keep(context)
        return self

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> MahalanobisPaper:
        super().fit_statistics(stats, head)
        if self.backbone is None:
            raise ConfigError("mahalanobis_paper needs the network and its training images: call bind and prepare.")
        self.terms = stage_terms(stats, self.stage_names, "mahalanobis_paper")
        self.fit_regression(self.own_pass.take())
        return self

    def confidences(self, x: Tensor, features_fn: Features, magnitudes: Sequence[float]) -> Tensor:
        """(M, N, K) per-layer confidences ``-d / 2`` of ``x`` for each magnitude (the gradient signs computed once)."""
        names = self.stage_names
        signs = descent_signs(self.backbone, self.terms, names, x, features_fn) if any(magnitudes) else []
        return torch.stack(
            [-0.5 * moved_distances(self.backbone, self.terms, names, x, features_fn, signs, m) for m in magnitudes]
        )

    def fit_regression(self, context) -> None:
        """Choose the magnitude and fit the regression (see the class docstring), identically on every DDP rank:
        each rank measures its share of the images, the confidences are summed across ranks by image index."""
        backbone, features_fn = self.backbone, self.backbone.features
        loader = context.training_images(self.images, self.seed)
        n = len(loader.dataset)
        half = n // 2
        if half < 10:
            raise ConfigError(f"mahalanobis_paper needs at least 20 ID training images to fit on, this run has {n}.")
        device = network_device(backbone)
        found = torch.zeros(2, len(self.magnitudes), n, len(self.stage_names), dtype=torch.float64, device=device)
        for x, (_, labels, index) in network_batches(backbone, loader, "mahalanobis_paper: regression", False):
            labels, index = labels.to(device), index.to(device)
            twins = fgsm(backbone, x, labels, self.adversarial_noise)
            for kind, batch in enumerate((x, twins)):
                found[kind, :, index] = self.confidences(batch, features_fn, self.magnitudes)
        if context.sum_across is not None:
            found = context.sum_across(found)
        found = found.cpu()
        labels = torch.cat([torch.zeros(half), torch.ones(half)]).double()
        is_id = torch.cat([torch.ones(n - half, dtype=torch.bool), torch.zeros(n - half, dtype=torch.bool)])
        best = None
        for m, magnitude in enumerate(self.magnitudes):
            clean, twin = found[0, m], found[1, m]  # (n, K)
            coef, intercept, c = logistic_regression_cv(torch.cat([clean[:half], twin[:half]]), labels)
            held_out = torch.cat([clean[half:], twin[half:]])
            scores = -torch.sigmoid(held_out @ coef + intercept)
            fpr = float(fpr_at_tpr(scores, is_id, 0.95, threshold="closest"))
            if best is None or fpr < best[0]:
                best = (fpr, magnitude, coef, intercept, c)
        fpr, self.magnitude, coef, intercept, c = best
        self.coef, self.intercept = coef.to(device), intercept.to(device)
        weights = ", ".join(f"{w:.4g}" for w in coef.tolist())
        context.log(
            f"mahalanobis_paper: magnitude {self.magnitude} (FPR95 {100 * fpr:.2f}% on {n - half} held-out ID training "
            f"images vs their FGSM twins), regression on {half} others: C {c:.4g}, weights [{weights}], intercept "
            f"{float(intercept):.4g}."
        )

    def forward(self, batch: Batch) -> Tensor:
        if self.magnitude is None:
            raise RuntimeError("mahalanobis_paper is not fitted: call fit_statistics (after prepare).")
        inputs, features_fn = check_input_batch(batch, "mahalanobis_paper")
        s = self.confidences(inputs, features_fn, (self.magnitude,))[0]  # (N, K)
        # float64, as the authors' predict_proba: in float32 every score with w . s + b > 17 would tie at -1
        return -torch.sigmoid(s @ self.coef.to(s.dtype) + self.intercept.to(s.dtype))


def fgsm(backbone: nn.Module, x: Tensor, labels: Tensor, noise: float) -> Tensor:
    """The authors' adversarial twins: ``clamp(x + noise * sign(grad_x CE(f(x), y)), 0, 1)``, ``y`` the labels."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(backbone(x), labels), x)
    return (x.detach() + noise * torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ logistic regression
def stratified_folds(labels: Tensor, folds: int = 5) -> Tensor:  # (n,) -> (n,) fold of each sample
    """sklearn's ``StratifiedKFold(folds)`` without shuffling: classes in order of first appearance; within a class,
    samples in order fill fold 0, then 1, ..., with the counts of a round-robin deal of the sorted labels."""
    classes = list(dict.fromkeys(labels.tolist()))
    encoded = torch.tensor([classes.index(v) for v in labels.tolist()])
    dealt = encoded.sort().values
    fold_of = torch.empty_like(encoded)
    for k in range(len(classes)):
        counts = torch.stack([(dealt[i::folds] == k).sum() for i in range(folds)])
        fold_of[encoded == k] = torch.arange(folds).repeat_interleave(counts)
    return fold_of


def logistic_regression(x: Tensor, y: Tensor, c: float, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """``argmin_{w, b} C * sum_i log(1 + exp(-y_i' (x_i . w + b))) + ||w||^2 / 2`` (y' = +-1; sklearn's L2 objective,
    the intercept not penalised), by Newton's method with backtracking, in float64. Returns ``(w (K,), b ())``."""
    x, y = x.double(), y.double()
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # (n, K + 1)
    penalty = torch.ones(a.shape[1], dtype=x.dtype)
    penalty[-1] = 0.0

    def objective(theta: Tensor) -> Tensor:
        z = a @ theta
        return c * (F.softplus(z) - y * z).sum() + 0.5 * (penalty * theta * theta).sum()

    theta = torch.zeros(a.shape[1], dtype=x.dtype)
    value = objective(theta)
    for _ in range(iterations):
        p = torch.sigmoid(a @ theta)
        grad = c * a.T @ (p - y) + penalty * theta
        hessian = c * (a.T * (p * (1 - p))) @ a + torch.diag(penalty)
        step = torch.linalg.lstsq(hessian, grad[:, None]).solution[:, 0]
        decrease = float(grad @ step)
        if decrease <= 1e-12 * (1.0 + abs(float(value))):
            break
        t = 1.0
        while t > 1e-12:
            candidate = objective(theta - t * step)
            if candidate <= value - 1e-4 * t * decrease:
                break
            t /= 2
        else:
            break
        theta, value = theta - t * step, candidate
    return theta[:-1], theta[-1]


def logistic_regression_cv(
    x: Tensor, y: Tensor, cs: Sequence[float] = LOGISTIC_CS, folds: int = 5
) -> tuple[Tensor, Tensor, float]:
    """sklearn's ``LogisticRegressionCV()`` with its defaults, as the authors call it: L2 penalty, C chosen among
    ``logspace(-4, 4, 10)`` by the accuracy summed over a stratified 5-fold split without shuffling (the first C of
    the best), then refitted on all samples. Returns ``(w (K,), b (), C)``."""
    x, y = x.double(), y.double()
    fold_of = stratified_folds(y, folds)
    accuracy = torch.zeros(len(cs), dtype=torch.float64)
    for fold in range(folds):
        train, test = fold_of != fold, fold_of == fold
        for i, c in enumerate(cs):
            w, b = logistic_regression(x[train], y[train], c)
            accuracy[i] += ((x[test] @ w + b > 0).double() == y[test]).double().mean()  # sklearn predicts 1 at > 0
    best = int((accuracy == accuracy.max()).nonzero()[0])
    w, b = logistic_regression(x, y, cs[best])
    return w, b, cs[best]


# ------------------------------------------------------------------------------------------------ statistics
