"""Where a network lives and the precision its outputs are scored in: the one place every pass and scorer asks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def as_float(x: Tensor) -> Tensor:
    """``x`` in at least float32: half-precision activations are widened, float64 ones (a ``double()`` model) kept."""
    return x if x.dtype == torch.float64 else x.float()


def network_device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def network_dtype(network: nn.Module) -> torch.dtype:
    """The dtype of the network's weights: float32 unless the network was cast (``double()``, ``*-true``)."""
    return next(network.parameters()).dtype
