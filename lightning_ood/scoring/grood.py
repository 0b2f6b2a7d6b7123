"""GrOOD: the gradient of a nearest-class-prototype loss with respect to an OOD prototype, scored by its nearest
training gradient (ElAraby, Sahoo, Pequignot, Novello & Paull, "GROOD: Gradient-Aware Out-of-Distribution
Detection", TMLR 2025; OpenOOD's ``grood`` postprocessor, contributed by the first author).

As the authors' code (``openood/postprocessors/grood.py``; defaults ``configs/postprocessors/grood.yaml``):

- class prototypes ``p_c``: the mean penultimate feature of each class over the training set (``update_prototype``,
  lines 918-951; here the statistics' exact class means);
- the loss (``compute_ncc_loss``, lines 696-745): cross-entropy of the C + 1 "logits" ``-||h - p_j||`` over the
  class prototypes and the OOD prototype ``p_ood``, at the predicted class. Its gradient with respect to ``p_ood``
  is ``g(h) = softmax(-||h - p_j||)_ood * (h - p_ood) / ||h - p_ood||`` (their ``_compute_grad_directly``, lines
  747-784, the same vector as the autograd of lines 786-846), whatever the predicted class;
- the gradients of the correctly classified training images are indexed (``index_grads``, lines 648-694; here those
  of the ``bank``, all of them on CIFAR as theirs), and score = minus the squared L2 distance from ``g(h)`` to the
  nearest of them (``postprocess``, lines 848-875; faiss's L2 distances are squared).

Where this differs from their code: the nearest gradient is found exactly (theirs: faiss ``IndexIVFFlat`` with
``4 sqrt(b)`` cells, ``b`` = 80% of the batches up to 600, 4 of them probed: approximate, and the batch that trains
the index is left out of it). The OOD prototype of their default configuration (``use_val_ood: True``) is the mean
feature of 100 images of OpenOOD's OOD validation set, which this project does not use: no OOD image is seen before
the test. Of their other sources we offer ``mean`` (``use_proto_mean``, lines 214-219: the mean of the class
prototypes), our default, and ``noise`` (``use_gaussian_noise``, lines 150-188: uniform noise images in [0, 1],
blurred with a 5 x 7 Gaussian kernel of sigma drawn from [0.2, 5], fed unnormalised as theirs; of each 100 the 10
with the lowest energy kept, their mean feature), seeded here. Their ``use_synthetic`` (mixup of an early layer with
the second class's early prototype, lines 221-305) is not offered.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.precision import network_device, network_dtype
from lightning_ood.scoring.base import Scorer, as_float, check_count, check_seed
from lightning_ood.scoring.logits import check_choice
from lightning_ood.scoring.neighbours import kth_smallest_squared_distance
from lightning_ood.statistics import Bank, FeatureStatistics

NOISE_BATCH, NOISE_KEPT = 100, 10  # grood.py lines 167-168: 100 noise images per draw, the 10 lowest-energy kept


def noise_prototype(backbone: nn.Module, shape: tuple[int, ...], images: int, seed: int) -> Tensor:  # -> (L,)
    """The authors' uniform-noise OOD prototype (``get_uniform_noise``), from a seeded generator."""
    from torchvision.transforms.functional import gaussian_blur

    generator = torch.Generator().manual_seed(seed)
    device, dtype = network_device(backbone), network_dtype(backbone)
    kept = []
    for _ in range(math.ceil(images / NOISE_BATCH)):
        x = torch.rand((NOISE_BATCH, *shape), generator=generator)
        sigma = 0.2 + 4.8 * float(torch.rand((), generator=generator, dtype=torch.float64))
        x = gaussian_blur(x, kernel_size=[5, 7], sigma=[sigma, sigma]).to(device, dtype)
        with torch.no_grad():
            h = backbone.features(x)
            lowest = torch.logsumexp(backbone.head(h), dim=1).topk(NOISE_KEPT, largest=False).indices
        kept.append(h[lowest])
    return torch.cat(kept).double().mean(dim=0)


class GrOOD(Scorer):
    """``score = -min_i ||g(h) - g(h_i)||^2`` over the correctly classified training features ``h_i``, with ``g`` the
    gradient of the nearest-class-prototype cross-entropy with respect to the OOD prototype.

    Args:
        ood_prototype: ``mean`` (the mean of the class prototypes, the authors' ``use_proto_mean``) or ``noise``
            (their blurred uniform-noise images, ``use_gaussian_noise``; needs the network before fitting).
        noise_images: noise images drawn for ``noise`` (``n_noise_samples: 100``, grood.yaml line 8).
        seed: seeds the noise images.
    """

    needs_statistics = frozenset({Bank})
    SOURCES = ("mean", "noise")
    # grood.yaml's sweep (lines 25-33) toggles use_gaussian_noise and use_val_ood (OOD validation images: not here)
    search_space: ClassVar[dict[str, tuple]] = {"ood_prototype": SOURCES}

    def __init__(self, ood_prototype: str = "mean", noise_images: int = 100, seed: int = 0) -> None:
        super().__init__()
        self.ood_prototype = check_choice("ood_prototype", ood_prototype, self.SOURCES)
        self.noise_images = check_count("noise_images", noise_images)
        self.seed = check_seed("seed", seed)
        self.noise: Tensor | None = None

    def prepare(self, context) -> GrOOD:
        """With ``ood_prototype: noise``, the noise images' mean feature (the input size of the training images)."""
        if self.ood_prototype != "noise":
            return self
        backbone = getattr(context, "backbone", None)
        if context is None or context.training_images is None or not hasattr(backbone, "features"):
            raise ConfigError(
                "grood with ood_prototype: noise feeds noise images to the network before fitting, which needs the "
                "network and its training images (for their size): use ood_prototype: mean on cached features."
            )
        image = next(iter(context.training_images(1, self.seed)))[0]  # (1, 3, H, W)
        self.noise = noise_prototype(backbone, tuple(image.shape[1:]), self.noise_images, self.seed)
        return self

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> GrOOD:
        super().fit_statistics(stats, head)
        dtype = self.weight.dtype
        prototypes = stats.class_means.to(dtype)  # (C, L)
        if self.ood_prototype == "noise":
            if self.noise is None:
                raise ConfigError("grood with ood_prototype: noise is fitted after prepare(context) draws the images.")
            ood = self.noise.to(prototypes.device, dtype)
        else:
            ood = prototypes.mean(dim=0)
        self.prototypes = torch.cat([prototypes, ood[None]])  # (C + 1, L), the OOD prototype last
        bank = stats.bank.to(prototypes.device, dtype)
        right = self.head_logits(bank).argmax(dim=1) == stats.bank_labels.to(bank.device)
        if not right.any():
            raise ConfigError("grood indexes the gradients of correctly classified training images: there are none.")
        self.indexed = self.gradients(bank[right])  # (M, L)
        return self

    def gradients(self, h: Tensor) -> Tensor:  # (N, L) -> (N, L)
        prototypes = self.prototypes.to(h.dtype)
        p_ood = torch.softmax(-torch.cdist(h, prototypes), dim=1)[:, -1:]  # (N, 1)
        away = h - prototypes[-1]
        return p_ood * away / away.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        g = self.gradients(as_float(features))
        return -kth_smallest_squared_distance(g, self.indexed.to(g.dtype), 1)


__all__ = ["GrOOD", "noise_prototype"]
