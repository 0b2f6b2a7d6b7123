"""AdaSCALE-A and AdaSCALE-L: SCALE with a per-image percentile chosen by how much a small input perturbation moves
the image's strongest activations (Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection", arXiv 2503.08023).

As the authors compute it (sudarshanregmi/AdaSCALE at 4b6dd50 and OpenOOD at 3c35632, both
``openood/postprocessors/adascale_postprocessor.py`` and ``openood/networks/adascale_net.py``; line numbers below are
OpenOOD's):

1. The perturbation (``postprocess`` lines 85-96, ``perturb`` lines 105-114): the gradient g of the image's largest
   logit with respect to the normalised input; the ``floor(o * 3HW)`` input values of SMALLEST ``|g|`` move by
   ``0.5 * sign(g)`` (normalised units, no std; a zero gradient does not move), the others stay. h = the penultimate
   features of the image (of that gradient pass), h' = those of the perturbed image.
2. The shift statistic (``get_percentile`` lines 69-77): ``Q' = sum_{top k2 of h} relu(h') + lambda * sum_{top k1 of h}
   |h - h'|``, the tops taken over the units of h, ``k = int(L * percent / 100)``.
3. The percentile (lines 78-80): ``p = p_min + (1 - F(Q')) (p_max - p_min)``, F the empirical CDF (statsmodels'
   ``ECDF``: the share of fitted values <= Q') of Q' over ID images: a likely-OOD image (a large shift) gets p near
   p_min, so a milder scaling.
4. SCALE at p (``ada_scale``, adascale_net.py lines 34-48): ``r = sum(relu(h)) / sum of its top k``, ``k = L -
   round(L p / 100)``; AdaSCALE-A scores ``energy(W (h exp(r)) + b)`` (line 23), AdaSCALE-L ``energy((W h + b) r^2)``
   (line 21).

k1 and k2 follow the paper and the authors' README (k1 = 1% of the units for the shift, k2 = 5% for the correction
term ``relu(h')``); OpenOOD's config names them the other way round (``k1: 5``, ``k2: 1``) and computes the same
statistic. The authors' repository swapped the names (commit 61e23f8) in the config and in ``set_hyperparam``, which
fits F, but not in ``get_percentile``, which scores: at its HEAD the fitted and the scored statistics differ (1% and 5%
exchanged). Here, as in OpenOOD and the paper, both use 1% for the shift and 5% for the correction.

The ID images F is fitted on: the authors use OpenOOD's ID validation split (``id_loader_dict['val']``, lines 31-63),
``num_samples`` = 5,000 of them drawn at random; here ``reference: id_val`` (held-out ID images, never scored: the
``data.val_split`` images, else 2,000 seeded training images, :func:`lightning_ood.fitting.reference_images`), a
seeded subset of ``images`` of them; ``reference: train`` takes ``images`` seeded training images instead.

Two guards the authors' code lacks, as our SCALE (:func:`lightning_ood.scoring.activation.top_kept`, ``scale``): at
least one activation is kept (their ``k`` is 0 when ``round(L p / 100) = L``) and a zero activation sum gives r = 0
(their 0 / 0 is NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError
from lightning_ood.features import network_batches
from lightning_ood.precision import as_float, network_device, network_dtype
from lightning_ood.scoring.base import (
    Batch,
    OwnPass,
    Scorer,
    check_nonnegative,
    check_number,
    check_percentile,
    check_reference,
    check_seed,
    energy,
)
from lightning_ood.scoring.logits import check_choice
from lightning_ood.statistics import FeatureStatistics

STEP = 0.5  # the perturbation of a chosen input value, in normalised units (perturb, line 113)
FIT_REFERENCES = ("id_val", "train")


# ------------------------------------------------------------------------------------------------ the pieces
def perturbed_features(
    inputs: Tensor, features_of: Callable[[Tensor], Tensor], head_logits: Callable[[Tensor], Tensor], share: float
) -> tuple[Tensor, Tensor]:  # (N, 3, H, W) -> h, h' (N, L)
    """The features of the images and of their perturbed copies: the ``int(share * 3HW)`` input values of smallest
    absolute gradient of the largest logit each move by ``STEP`` times the gradient's sign."""
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.detach().clone().requires_grad_(True)
        features = features_of(x)
        logits = head_logits(features)
        top = logits.detach().argmax(dim=1, keepdim=True)
        (grad,) = torch.autograd.grad(logits.gather(1, top).sum(), x)
    flat = grad.abs().flatten(1)  # (N, 3HW)
    chosen = flat.topk(int(flat.shape[1] * share), dim=1, largest=False).indices
    mask = torch.zeros_like(flat).scatter_(1, chosen, 1.0).view_as(grad)
    with torch.no_grad():
        perturbed = features_of(inputs.detach() + grad.sign() * mask * STEP)
    return features.detach(), perturbed


def shift_statistic(h: Tensor, h_perturbed: Tensor, shift_k: int, correction_k: int, weight: float) -> Tensor:
    """``Q'`` (N,): the ``relu(h')`` of the ``correction_k`` largest units of h plus ``weight`` times the shift
    ``|h - h'|`` of its ``shift_k`` largest units."""
    correction = h_perturbed.relu().gather(1, h.topk(correction_k, dim=1).indices).sum(dim=1)
    shift = (h - h_perturbed).abs().gather(1, h.topk(shift_k, dim=1).indices).sum(dim=1)
    return correction + weight * shift


def adaptive_percentiles(q: Tensor, fitted: Tensor, low: float, high: float) -> Tensor:  # (N,) -> (N,) float64
    """``low + (1 - F(q)) (high - low)``, F the empirical CDF of the sorted ``fitted`` values (``<=``)."""
    below = torch.searchsorted(fitted, q.to(fitted.dtype).contiguous(), right=True)
    return low + (1.0 - below.double() / len(fitted)) * (high - low)


def adaptive_ratio(x: Tensor, percentiles: Tensor) -> Tensor:  # (N, n), (N,) -> (N, 1)
    """SCALE's ``s1 / s2`` with a percentile per row: ``s2`` the sum of the row's ``n - round(n p / 100)`` largest
    values (at least one, as :func:`~lightning_ood.scoring.activation.top_kept`)."""
    n = x.shape[1]
    kept = (n - torch.round(n * percentiles.double() / 100.0).long()).clamp(1, n)  # (N,)
    values = x.topk(int(kept.max()), dim=1).values  # sorted, largest first
    top_sum = (values * (torch.arange(values.shape[1], device=x.device) < kept[:, None])).sum(dim=1, keepdim=True)
    return x.sum(dim=1, keepdim=True) / top_sum.clamp_min(1e-12)


# ------------------------------------------------------------------------------------------------ the scorer
# The authors' grid (sudarshanregmi/AdaSCALE configs/postprocessors/adascale_a.yml line 12: p_min 60, "only tune
# p_max"); OpenOOD's adascale_a.yml line 12 sweeps every pair of 60 ... 95 below 65 ... 99.
PERCENTILE_GRID = tuple((60.0, high) for high in (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 99.0))


class AdaSCALE(Scorer):
    """AdaSCALE-A (``variant="a"``: the features scaled by ``exp(r)``) or AdaSCALE-L (``"l"``: the logits by ``r^2``),
    energy of the result; ``r`` is SCALE's ratio at a percentile between ``percentiles`` chosen per image (see the
    module docstring). Costs one forward and backward pass and one more forward pass per test image.

    Args:
        variant: ``a`` or ``l``.
        percentiles: ``(p_min, p_max)``: (75, 85), the authors' default (``adascale_a.yml`` / ``adascale_l.yml`` line
            6, OpenOOD's and theirs); ImageNet ResNet-50: (80, 85) (their ``adascale_a_hyperparam.yml`` of
            ``results/imagenet_resnet50_tvsv1_base_default``; ``configs/scorers/openood_imagenet.yaml``).
        shift_percent: k1, the share (%) of the largest units whose shift counts (1, the paper and the README).
        correction_percent: k2, the share (%) of the largest units whose perturbed activation counts (5).
        shift_weight: lambda (10, line 9 of the configs).
        perturbed_share: o, the share of input values perturbed (0.05, line 10).
        images: at most this many reference images fit F (5,000, ``num_samples``, line 5).
        reference: ``id_val`` (the authors: ID validation images) or ``train`` (seeded training images).
        seed: the seed of the subset of ``images``.
    """

    needs_inputs = True
    search_space: ClassVar[dict[str, tuple]] = {"percentiles": PERCENTILE_GRID}

    def __init__(
        self,
        variant: str = "a",
        percentiles: tuple[float, float] = (75.0, 85.0),
        shift_percent: float = 1.0,
        correction_percent: float = 5.0,
        shift_weight: float = 10.0,
        perturbed_share: float = 0.05,
        images: int = 5000,
        reference: str = "id_val",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.variant = check_choice("variant", variant, ("a", "l"))
        percentiles = tuple(percentiles)
        if len(percentiles) != 2:
            raise ConfigError(f"adascale percentiles must be a pair (p_min, p_max), got {percentiles!r}.")
        for value in percentiles:
            check_percentile("percentiles", value)
        if not percentiles[0] <= percentiles[1] < 100.0:
            raise ConfigError(f"adascale percentiles need p_min <= p_max < 100, got {percentiles!r}.")
        check_percentile("shift_percent", shift_percent)
        check_percentile("correction_percent", correction_percent)
        check_nonnegative("shift_weight", shift_weight)
        check_number("perturbed_share", perturbed_share)
        if perturbed_share is None or not 0.0 <= perturbed_share <= 1.0:
            raise ConfigError(f"adascale perturbed_share must be a fraction in [0, 1], got {perturbed_share!r}.")
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ConfigError(f"adascale images must be an integer >= 1, got {images!r}.")
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.shift_percent = shift_percent
        self.correction_percent = correction_percent
        self.shift_weight = shift_weight
        self.perturbed_share = perturbed_share
        self.images = images
        self.reference = check_reference(reference, FIT_REFERENCES)
        self.seed = check_seed("seed", seed)
        self.own_pass = OwnPass("adascale", f"fits its shift distribution on perturbed {self.reference} images")

    def prepare(self, context) -> AdaSCALE:
        """Keep the run's images: F is fitted on them once the head is known."""
        self.own_pass.keep(context, "training_images" if self.reference == "train" else "reference_images")
        return self

    def unit_counts(self, units: int) -> tuple[int, int]:
        """``(k1, k2)`` in units, as the authors' ``int(L * k / 100)``."""
        return int(units * self.shift_percent / 100), int(units * self.correction_percent / 100)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> AdaSCALE:
        super().fit_statistics(stats, head)
        context = self.own_pass.take()
        key = f"adascale:{self.reference}:{self.perturbed_share}" + (f":{self.images}:{self.seed}"
                                                                     if self.reference == "train" else "")  # fmt: skip
        h, h_perturbed = context.shared(key, lambda: self.measure(context))
        if self.reference != "train" and len(h) > self.images:
            order = torch.randperm(len(h), generator=torch.Generator().manual_seed(self.seed))
            keep = order[: self.images].sort().values.to(h.device)
            h, h_perturbed = h[keep], h_perturbed[keep]
        shift_k, correction_k = self.unit_counts(h.shape[1])
        q = shift_statistic(h, h_perturbed, shift_k, correction_k, self.shift_weight)
        self.fitted_shifts = q.sort().values  # (n,) F's sample
        context.log(
            f"adascale_{self.variant}: shift distribution fitted on {len(q)} perturbed {self.reference} images "
            f"(median Q' {float(q.median()):.4g})."
        )
        return self

    def measure(self, context) -> tuple[Tensor, Tensor]:  # -> h, h' (n, L) of every image, in index order
        """h and h' of every image of the reference loader, identical on every DDP rank (each rank measures its
        share, placed by index and summed across ranks)."""
        backbone = context.backbone
        loader = context.training_images(self.images, self.seed) if self.reference == "train" else (
            context.reference_images(self.reference)
        )  # fmt: skip
        n = len(loader.dataset)
        device, dtype = network_device(backbone), network_dtype(backbone)
        found = torch.zeros(2, n, backbone.feature_dim, dtype=dtype, device=device)
        for images, (_, _, index) in network_batches(backbone, loader, f"adascale_{self.variant}", progress=False):
            h, h_perturbed = perturbed_features(images, backbone.features, self.head_logits, self.perturbed_share)
            found[0, index.to(device)], found[1, index.to(device)] = h, h_perturbed
        if context.sum_across is not None:
            found = context.sum_across(found).to(device)
        return found[0], found[1]

    def forward(self, batch: Batch) -> Tensor:
        if batch.inputs is None or batch.features_of is None:
            raise ValueError("adascale perturbs the input images: its Batch needs inputs and features_of")
        h, h_perturbed = perturbed_features(batch.inputs, batch.features_of, self.head_logits, self.perturbed_share)
        return self.score_shifted(as_float(h), as_float(h_perturbed))

    def score_shifted(self, h: Tensor, h_perturbed: Tensor) -> Tensor:  # (N, L), (N, L) -> (N,)
        """The score of features and their perturbed copies (the pure form the tests call)."""
        shift_k, correction_k = self.unit_counts(h.shape[1])
        q = shift_statistic(h, h_perturbed, shift_k, correction_k, self.shift_weight)
        p = adaptive_percentiles(q, self.fitted_shifts, *self.percentiles)
        ratio = adaptive_ratio(h.relu(), p)  # (N, 1)
        if self.variant == "a":
            return energy(self.head_logits(h * torch.exp(ratio)))
        return energy(self.head_logits(h) * ratio**2)


__all__ = ["AdaSCALE", "adaptive_percentiles", "adaptive_ratio", "perturbed_features", "shift_statistic"]
