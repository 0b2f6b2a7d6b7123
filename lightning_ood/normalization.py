"""The input normalisation of a network: per-channel ``(x - mean) / std`` of pixels in [0, 1].

It belongs to the weights: a network evaluated with another normalisation than it was trained with silently computes
other features. Published weights bring theirs (see :mod:`lightning_ood.models.formats`); the datasets' own
statistics are the default for networks trained here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ood.errors import ConfigError

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` of pixel values in [0, 1], and where the values come from."""

    mean: Triple
    std: Triple
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"normalization {name} needs 3 values (R, G, B), got {list(value)}.")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.std) <= 0:
            raise ConfigError(f"normalization std must be > 0, got {list(self.std)}.")

    def as_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}

    @classmethod
    def from_dict(cls, value: dict[str, Any], source: str | None = None) -> Normalization:
        """From ``{mean: [...], std: [...], source: ...}`` (a config entry or what a checkpoint stores)."""
        if not isinstance(value, dict) or not {"mean", "std"} <= set(value):
            raise ConfigError(f"normalization must be a mapping with 'mean' and 'std' (3 values each), got {value!r}.")
        return cls(tuple(value["mean"]), tuple(value["std"]), source or str(value.get("source", "")))

    def same_values(self, other: Normalization | None) -> bool:
        return other is not None and (self.mean, self.std) == (other.mean, other.std)

    def describe(self) -> str:
        values = f"mean ({', '.join(f'{v:.4f}' for v in self.mean)}), std ({', '.join(f'{v:.4f}' for v in self.std)})"
        return f"{values}, {self.source}" if self.source else values

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) network input -> pixels in [0, 1]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def normalize(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) pixels in [0, 1] -> network input
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


# Per-channel statistics of the training sets (pixel values in [0, 1]).
NORMALIZATION: dict[str, Normalization] = {
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR-10 training-set statistics"),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR-100 training-set statistics"),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "ImageNet statistics (torchvision)"),
}
