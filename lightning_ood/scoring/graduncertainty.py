"""Gradient uncertainty (Lee & AlRegib, ICIP 2020, "Gradients as a Measure of Uncertainty in Neural Networks").

The loss is the binary cross-entropy between the softmax and a confounding label of all ones,
``L = -sum_c log p_c``, whose gradient with respect to the logits is ``C p - 1``: zero for a uniform softmax, large
for a confident one. The score is the sum over the network's parameters of the squared L2 norms of the gradient of
``L`` for the image (higher = more confident = ID).

The authors concatenate the per-layer squared norms and train a classifier on ID and OOD gradients (their Section 4;
no code was released), which needs OOD data; pytorch-ood 0.4 (``detector/graduncertainty.py``) scores the negative
sum of the norms instead, without training, and that is what these scorers compute:

- :class:`GradUncertainty` (``graduncertainty``): every parameter of the network, pytorch-ood's default; one
  gradient per image (``torch.func``), so it reads the input images.
- :class:`GradUncertaintyHead` (``graduncertainty_head``, ours): the head's weight and bias only (pytorch-ood with a
  ``param_filter`` on them), in closed form: ``(||h||^2 + 1) * ||C p - 1||^2``, from the features and the logits.

pytorch-ood differentiates ``F.binary_cross_entropy``, whose backward divides by ``max(p (1 - p), 1e-12)``: for a
class with ``p < 1e-12`` its gradient is smaller than ``-1 / p``, so its scores differ where the softmax holds such
probabilities; here the loss is ``-sum_c log_softmax`` (the exact gradient ``C p - 1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_ood.scoring.base import Batch, Scorer, as_float
from lightning_ood.statistics import FeatureStatistics

CHUNK = 16  # images whose per-parameter gradients are held at once (memory grows with it, not the result)


def confounding_gradient(logits: Tensor) -> Tensor:  # (N, C) -> (N, C)
    """``d/dz -sum_c log softmax(z)_c = C softmax(z) - 1``, in float64."""
    return logits.double().softmax(dim=1) * logits.shape[1] - 1


class GradUncertaintyHead(Scorer):
    """Squared L2 norm of the confounding-label gradient with respect to the head's weight and bias:
    ``(||h||^2 + 1) * ||C p - 1||^2`` (``||h||^2`` alone for a head without bias)."""

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> GradUncertaintyHead:
        super().fit_statistics(stats, head)
        self.with_bias = head.bias is not None
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        # dL/dW = g h^T, dL/db = g: the squared norm of an outer product is the product of the squared norms
        squared_feature = features.double().square().sum(dim=1) + float(self.with_bias)
        return (squared_feature * confounding_gradient(logits).square().sum(dim=1)).to(as_float(logits).dtype)


class GradUncertainty(Scorer):
    """Sum over every parameter of the network of the squared L2 norm of the confounding-label gradient of the image
    (pytorch-ood's ``GradUncertainty`` with its default ``param_filter``, sign aside). The network runs once more,
    per image, with its gradient."""

    needs_inputs = True

    def __init__(self) -> None:
        super().__init__()
        self.network: nn.Module | None = None

    def bind(self, backbone: nn.Module) -> GradUncertainty:
        self.network = backbone  # a plain reference (see Scorer.__setattr__): the backbone moves its own parameters
        return self

    def forward(self, batch: Batch) -> Tensor:  # (N, 3, H, W) -> (N,)
        if batch.inputs is None:
            raise ValueError("GradUncertainty differentiates the network on the input images: its Batch needs inputs")
        if self.network is None:
            raise ValueError("GradUncertainty needs the network: call bind(backbone) before scoring")
        return squared_gradient_norms(self.network, batch.inputs).to(as_float(batch.logits).dtype)


def squared_gradient_norms(network: nn.Module, inputs: Tensor) -> Tensor:  # (N, ...) -> (N,) float64
    """Per image, ``sum over the parameters of ||dL/dtheta||^2`` for ``L = -sum_c log softmax(network(x))_c``."""
    totals = []
    with torch.inference_mode(False), torch.enable_grad():
        params = {name: p.detach() for name, p in network.named_parameters()}
        buffers = {name: b.detach() for name, b in network.named_buffers()}

        def loss(params: dict[str, Tensor], x: Tensor) -> Tensor:
            logits = functional_call(network, (params, buffers), (x[None],))  # (1, C)
            return -F.log_softmax(logits, dim=1).sum()

        per_image = vmap(grad(loss), in_dims=(None, 0))
        x = inputs.detach().clone()  # a normal tensor also when the batch was made in inference mode
        for start in range(0, len(x), CHUNK):
            grads = per_image(params, x[start : start + CHUNK])  # {name: (n, *shape)}
            totals.append(sum(g.double().square().flatten(1).sum(dim=1) for g in grads.values()))
    return torch.cat(totals).detach()
