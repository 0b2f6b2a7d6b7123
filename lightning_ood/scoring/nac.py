"""NAC-UE: neuron activation coverage (Liu et al., "Neuron Activation Coverage: Rethinking Out-of-distribution
Detection and Generalization", ICLR 2024).

As the authors compute it (BierOne/ood_coverage at b002780: ``openood/postprocessors/nac_postprocessor.py``,
``nac/coverage.py``, ``nac/utils.py``, ``nac/instr_state.py``):

1. The state of a neuron (``KMNC.assess`` / ``assess_ood``, coverage.py lines 137-158 and 175-195): for each layer,
   its output o and the gradient g of ``sum_images sum_c -log softmax_c / C`` (the cross-entropy to the uniform
   distribution, ``kl_grad``, instr_state.py lines 66-77) with respect to it; a (N, C, H, W) output and its
   gradient are each SUMMED over the positions (``avg_pooling``, utils.py lines 219-228: "we directly sum each
   element"); the state is ``sigmoid(alpha * o * g)`` (``get_state_func``, utils.py lines 110-112, written
   ``1 / (1 + exp(-alpha x))``).
2. The bins (``logspace(1e3, M)`` and ``Estimator``, coverage.py lines 267-314): M thresholds, ``log_1000`` of M/2
   evenly spaced points of [1, sqrt(1000)] (0 ... 0.5), mirrored (0.5 ... 1), the last raised to 1.01, then 1.2;
   the M - 1 intervals ``[t_i, t_{i+1})``. Fitting counts, per neuron and interval, the training images whose state
   falls in it.
3. The coverage (``get_score``, lines 316-326): ``min(count / O, 1)`` per neuron and interval; an image's score for a
   layer is the mean over the layer's neurons of the coverage of the interval its state falls in (``ood_test``, lines
   328-336; 0 outside every interval); the score is the mean over the layers (``single_ood_test``, lines 120-125).

The authors' layers on the ResNets (their README's commands): ``avgpool`` (the pooled penultimate features) and the
outputs of ``layer3``, ``layer2``, ``layer1``; here the features and the three ``backbone.stages()`` before the last
(``layer3``, ``layer2``, ``layer1`` on the CIFAR ResNet-18 and ResNet-50), each with its own M, O and alpha. The
images: the authors fit on ``valid_num`` = 1,000 training images drawn class-balanced (``TrainSubset(balanced=True)``,
utils.py lines 29-68: ``1000 / C`` per class); here a seeded subset of ``images`` training images (test transform)
drawn uniformly, so the classes are only about balanced. The counts are sums: exact under DDP.

The states need gradients, which the engine's one pass (under ``no_grad``) does not give: NAC runs the network again
on the inputs with the layers hooked (``needs_inputs``), one forward and one backward pass per image, as the authors'.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.features import network_batches
from lightning_ood.hooks import block_outputs, unknown_blocks
from lightning_ood.precision import as_float, device_constant, network_device, network_dtype
from lightning_ood.scoring.base import Batch, FittedTensors, OwnPass, Scorer, check_positive, check_seed
from lightning_ood.statistics import FeatureStatistics

FEATURES = "features"  # the pooled penultimate features: the authors' ``avgpool`` layer


# ------------------------------------------------------------------------------------------------ the pieces
@lru_cache
def coverage_thresholds(bins: int) -> tuple[float, ...]:
    """The authors' M thresholds (``logspace(1e3, M)``): log-1000 of ``bins / 2`` even steps over [1, sqrt(1000)]
    (0 ... 0.5), their mirror image (0.5 ... 1), the last raised by 0.01, and 1.2. In float64, with numpy as theirs."""
    half = bins // 2
    low = np.log(np.linspace(1.0, np.sqrt(1e3), num=half)) / np.log(1e3)
    edges = np.concatenate([low[:-1], (1.0 - low)[::-1]])
    edges[-1] += 1e-2
    return tuple(np.append(edges, 1.2).tolist())


def pooled(t: Tensor) -> Tensor:  # (N, C, H, W) or (N, C) -> (N, C)
    """A layer's output per neuron: summed over the positions, as the authors' ``avg_pooling``."""
    if t.ndim == 4:
        return t.sum(dim=(2, 3))
    if t.ndim == 2:
        return t
    raise ConfigError(f"nac reads (N, C, H, W) or (N, C) layer outputs, got shape {tuple(t.shape)}")


def layer_products(
    inputs: Tensor,
    features_of: Callable[[Tensor], Tensor],
    head_logits: Callable[[Tensor], Tensor],
    backbone: nn.Module,
    names: Sequence[str],
) -> list[Tensor]:  # (N, 3, H, W) -> per layer (N, C_l)
    """``pooled(o) * pooled(g)`` per layer: the outputs o of ``names`` (``FEATURES``: the penultimate features) and
    the gradients g of the cross-entropy to the uniform distribution with respect to them (one forward and one
    backward pass)."""
    blocks = [name for name in names if name != FEATURES]
    with torch.inference_mode(False), torch.enable_grad(), block_outputs(backbone, blocks, copy=False) as captured:
        x = inputs.detach().clone().requires_grad_(True)
        features = features_of(x)
        logits = head_logits(features)
        uniform = torch.full_like(logits, 1.0 / logits.shape[1])
        loss = (-uniform * F.log_softmax(logits, dim=1)).sum(dim=1).sum()
        outputs = [features if name == FEATURES else captured[name] for name in names]
        grads = torch.autograd.grad(loss, outputs)
    return [pooled(o.detach()) * pooled(g) for o, g in zip(outputs, grads, strict=True)]


def coverage_bins(products: Tensor, alpha: float, bins: int) -> Tensor:  # (N, C) -> (N, C) in [0, bins - 1]
    """The interval ``[t_i, t_{i+1})`` of each state ``sigmoid(alpha * product)``; ``bins - 1`` when it is in none
    (NaN, or >= 1.2: never). The states are float32 whatever the network's precision, as the authors': an edge sits
    at 0.5, where every neuron with ``o g`` about 0 lands (a small alpha puts them all there), and which side of it
    such a state falls on must not depend on the precision."""
    states = 1.0 / (1.0 + torch.exp(-alpha * products.float()))
    edges = device_constant(coverage_thresholds(bins), torch.float64, products.device)
    index = torch.bucketize(states.double(), edges, right=True) - 1  # t_index <= state < t_{index + 1}
    outside = (index < 0) | (index > bins - 2) | states.isnan()
    return torch.where(outside, bins - 1, index)


def bin_counts(index: Tensor, bins: int) -> Tensor:  # (N, C) -> (bins - 1, C) images per neuron and interval
    units = index.shape[1]
    flat = (index * units + torch.arange(units, device=index.device))[index < bins - 1]
    return torch.bincount(flat, minlength=bins * units)[: (bins - 1) * units].view(bins - 1, units)


# ------------------------------------------------------------------------------------------------ the scorer
# The authors' ResNet-18 hyperparameters per layer (avgpool, layer3, layer2, layer1): ood_coverage
# configs/postprocessors/nac/resnet/nac_cifar10.yml lines 9-28 (CIFAR-10, the defaults here), nac_cifar100.yml lines
# 9-28 (CIFAR-100: M 50/1000/50/50, O 50/500/500/5, alpha 50/10/1/0.005) and nac_imagenet.yml lines 9-28 (ResNet-50:
# M 50/50/500/1000, O 10/500/50/5000, alpha 3000/300/0.01/1; configs/scorers/openood_imagenet.yaml).
CIFAR10_BINS = (50, 500, 50, 500)
CIFAR10_COUNTS = (50, 100, 5, 100)
CIFAR10_ALPHAS = (100.0, 1000.0, 0.001, 0.001)
# Their CIFAR-10 search grid (nac_cifar10.yml lines 29-50), per layer, as whole settings of the four layers.
CIFAR10_GRID = {
    "bins": tuple(itertools.product((50,), (50, 500), (50,), (50, 500))),
    "full_counts": tuple(itertools.product((10, 50), (100,), (5, 10), (5, 10, 50, 100))),
    "alphas": tuple(itertools.product((100.0,), (1000.0, 5000.0), (0.001,), (0.001, 0.005))),
}


class NAC(Scorer):
    """NAC-UE: the mean, over layers and neurons, of how well the ID training images covered the interval of each
    neuron's state ``sigmoid(alpha * o * g)`` (see the module docstring); higher = more in-distribution.

    Args:
        layers: the layers read: ``features`` (the pooled penultimate features, the authors' ``avgpool``) or module
            names (``backbone.named_modules()``, ``<module>:input``); ``None``: ``features`` and the three
            ``backbone.stages()`` before the last, the authors' ``avgpool``, ``layer3``, ``layer2``, ``layer1``.
        bins: M per layer, even (the authors' CIFAR-10 ResNet-18: 50, 500, 50, 500).
        full_counts: O per layer, the training images that fill an interval (50, 100, 5, 100).
        alphas: the sigmoid's steepness per layer (100, 1000, 0.001, 0.001).
        images: the training images the coverage is fitted on (1,000, the authors' ``valid_num``, README).
        seed: the seed of their subset.
    """

    needs_inputs = True
    search_space: ClassVar[dict[str, tuple]] = CIFAR10_GRID

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        bins: Sequence[int] = CIFAR10_BINS,
        full_counts: Sequence[int] = CIFAR10_COUNTS,
        alphas: Sequence[float] = CIFAR10_ALPHAS,
        images: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.bins, self.full_counts, self.alphas = tuple(bins), tuple(full_counts), tuple(alphas)
        for m in self.bins:
            if isinstance(m, bool) or not isinstance(m, int) or m < 4 or m % 2:
                raise ConfigError(f"nac bins must be even integers >= 4 (the authors' thresholds), got {m!r}.")
        for o in self.full_counts:
            if isinstance(o, bool) or not isinstance(o, int) or o < 1:
                raise ConfigError(f"nac full_counts must be integers >= 1, got {o!r}.")
        for a in self.alphas:
            check_positive("alphas", a)
        self.alphas = tuple(float(a) for a in self.alphas)
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ConfigError(f"nac images must be an integer >= 1, got {images!r}.")
        self.layers = tuple(layers) if layers is not None else None
        sizes = {len(self.bins), len(self.full_counts), len(self.alphas)} | ({len(self.layers)} if layers else set())
        if len(sizes) != 1:
            raise ConfigError(f"nac needs one bins, full_counts and alphas value per layer, got {sorted(sizes)}.")
        self.images = images
        self.seed = check_seed("seed", seed)
        self.layer_names: tuple[str, ...] = ()
        self.backbone: nn.Module | None = None
        self.own_pass = OwnPass("nac", "counts the neuron states of ID training images")

    def bind(self, backbone: nn.Module) -> NAC:
        if self.layers is None:
            stages = list(backbone.stages())
            if len(stages) < 4:
                raise ConfigError(
                    f"nac reads the features and the three stages before the last (backbone.stages()), and "
                    f"{type(backbone).__name__} lists {len(stages)} stages: name its layers."
                )
            names = (FEATURES, stages[-2], stages[-3], stages[-4])
        else:
            names = self.layers
        modules = dict(backbone.named_modules())
        unknown = unknown_blocks([n for n in names if n != FEATURES], {}, modules)
        if unknown:
            raise ConfigError(f"nac layers {unknown} are not modules of {type(backbone).__name__}.")
        if len(names) != len(self.bins):
            raise ConfigError(f"nac has {len(self.bins)} bins values for the {len(names)} layers {list(names)}.")
        self.layer_names = tuple(names)
        self.backbone = backbone
        return self

    def prepare(self, context) -> NAC:
        """Keep the run's training images: the coverage is counted on them once the head is known."""
        self.own_pass.keep(context)
        return self

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> NAC:
        super().fit_statistics(stats, head)
        if self.backbone is None:
            raise ConfigError("nac needs the network and its training images: call bind and prepare.")
        context = self.own_pass.take()
        loader = context.training_images(self.images, self.seed)
        counts = self.count(loader)
        if context.sum_across is not None:
            counts = [context.sum_across(c) for c in counts]
        self.coverage = FittedTensors({
            name: ((c.to(network_device(self.backbone), network_dtype(self.backbone)) / o).clamp(max=1.0),)
            for name, c, o in zip(self.layer_names, counts, self.full_counts, strict=True)
        })  # fmt: skip
        context.log(f"nac: neuron coverage of {list(self.layer_names)} counted on {len(loader.dataset)} ID training "
                    f"images.")  # fmt: skip
        return self

    def count(self, loader) -> list[Tensor]:  # -> per layer (M - 1, C_l) float64
        backbone = self.backbone
        counts: list[Tensor] | None = None
        for images, _ in network_batches(backbone, loader, "nac: neuron coverage", progress=False):
            found = [
                bin_counts(coverage_bins(p, a, m), m).double()
                for p, a, m in zip(self.products(images, backbone.features), self.alphas, self.bins, strict=True)
            ]
            counts = found if counts is None else [c + f for c, f in zip(counts, found, strict=True)]
        if counts is None:
            raise ConfigError("nac: no training images to count the neuron coverage on.")
        return counts

    def products(self, inputs: Tensor, features_of: Callable[[Tensor], Tensor]) -> list[Tensor]:
        return layer_products(inputs, features_of, self.head_logits, self.backbone, self.layer_names)

    def forward(self, batch: Batch) -> Tensor:
        if batch.inputs is None or batch.features_of is None:
            raise ValueError("nac takes gradients through the network: its Batch needs inputs and features_of")
        if self.backbone is None:
            raise ConfigError("nac reads the network's layers: call bind(backbone).")
        return self.score_products([as_float(p) for p in self.products(batch.inputs, batch.features_of)])

    def score_products(self, products: Sequence[Tensor]) -> Tensor:  # per layer (N, C_l) -> (N,)
        """The score of the layers' ``pooled(o) * pooled(g)`` (the pure form the tests call)."""
        total = None
        for name, p, alpha, m in zip(self.layer_names, products, self.alphas, self.bins, strict=True):
            (coverage,) = self.coverage[name]  # (M - 1, C)
            table = torch.cat([coverage, coverage.new_zeros(1, coverage.shape[1])])  # row M - 1: no interval
            layer = table.gather(0, coverage_bins(p, alpha, m)).mean(dim=1) / len(products)
            total = layer if total is None else total + layer
        return total


__all__ = ["NAC", "bin_counts", "coverage_bins", "coverage_thresholds", "layer_products"]
