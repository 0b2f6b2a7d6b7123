"""Where a network lives and the precision its outputs are scored in: the one place every pass and scorer asks."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def as_float(x: Tensor) -> Tensor:
    """``x`` in at least float32: half-precision activations are widened, float64 ones (a ``double()`` model) kept."""
    return x if x.dtype == torch.float64 else x.float()


def device_constant(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a 1-D tensor on ``device``, made once per (values, dtype, device): building a tensor from Python
    values on a GPU is a synchronous copy, which stalls the host at every batch. Read it, never write into it."""
    return _device_constant(tuple(float(v) for v in values), dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _device_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


def network_device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device


def network_dtype(network: nn.Module) -> torch.dtype:
    """The dtype of the network's weights: float32 unless the network was cast (``double()``, ``*-true``)."""
    return next(network.parameters()).dtype
