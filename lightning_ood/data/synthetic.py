"""Generated data in memory, for tests, benchmarks and smoke runs: no files, deterministic given the seed.

ID images of class ``k`` are Gaussian noise around a class-specific colour (learnable within an epoch or two); OOD
sets are noise around colours no class uses (``shifted``) or plain N(0, 1) noise (``noise``). Values are already in
the network's input space.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_ood.data.base import DATA_ARGS, OODDataModule, check_at_least
from lightning_ood.data.reproducible import check_seed
from lightning_ood.data.transforms import Normalization
from lightning_ood.errors import ConfigError


def class_images(labels: torch.Tensor, size: int, generator: torch.Generator, spread: float = 0.8) -> torch.Tensor:
    """(N, 3, size, size) images whose per-channel mean encodes the label."""
    angles = labels.double()[:, None] * 2.399963 + torch.tensor([0.0, 2.094, 4.189], dtype=torch.float64)
    centres = angles.cos().float()  # (N, 3): distinct, bounded colours per class
    noise = torch.randn(len(labels), 3, size, size, generator=generator) * spread
    return centres[:, :, None, None] + noise


class SyntheticDataModule(OODDataModule):
    """Generated ID train/test sets and OOD sets of chosen sizes.

    Args:
        num_classes: ID classes.
        train_size: training images.
        test_size: ID test images.
        ood_sizes: OOD set name -> size; names starting with ``noise`` are N(0, 1) noise, others are shifted colours.
        image_size: side of the square images.
        seed: seed of everything generated.
        batch_size: training batch size.
        num_workers: loader workers (0: the data is in memory).
        **kwargs: the other arguments of :class:`~lightning_ood.data.base.OODDataModule` (``eval_batch_size``,
            ``ood`` for further registered sets such as ``gaussian_noise``, ``ood_root``, ``skip_missing_ood``,
            ``train_per_class``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        train_size: int = 200,
        test_size: int = 100,
        ood_sizes: dict[str, int] | None = None,
        image_size: int = 32,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        check_at_least("num_classes", num_classes, 1)
        check_seed(f"{DATA_ARGS}seed", seed)
        if train_size < num_classes:  # every class has a training image
            raise ConfigError(f"{DATA_ARGS}train_size must be >= num_classes ({num_classes}), got {train_size}.")
        check_at_least("test_size", test_size, 1)
        check_at_least("image_size", image_size, 1)
        for name, size in (ood_sizes or {}).items():
            check_at_least(f"ood_sizes.{name}", size, 1)
        self.num_classes = num_classes
        self.train_size, self.test_size, self.image_size, self.seed = train_size, test_size, image_size, seed
        self.ood_sizes = dict({"shifted": 100, "noise": 100} if ood_sizes is None else ood_sizes)
        self.default_normalization = Normalization((0.0,) * 3, (1.0,) * 3, "generated data, already in input space")

    @property
    def id_name(self) -> str:
        return "synthetic"

    def _labelled(self, size: int, offset: int) -> Dataset:
        generator = torch.Generator().manual_seed(self.seed * 1000 + offset)
        labels = torch.arange(size) % self.num_classes  # every class present, balanced
        return TensorDataset(class_images(labels, self.image_size, generator), labels)

    def _ood(self, name: str, size: int, offset: int) -> Dataset:
        generator = torch.Generator().manual_seed(self.seed * 1000 + offset)
        shape = (size, 3, self.image_size, self.image_size)
        if name.startswith("noise"):
            images = torch.randn(shape, generator=generator)
        else:
            images = torch.randn(shape, generator=generator) * 0.8 + 2.5  # brighter than any class colour
        return TensorDataset(images, torch.full((size,), -1))

    def prepare_data(self) -> None:
        self.prepare_ood_sets()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._labelled(self.train_size, 1)
            self.statistics_set = self.train_set
        if not self.test_sets:
            self.test_sets = {"synthetic": self._labelled(self.test_size, 2)}
            for i, (name, size) in enumerate(self.ood_sizes.items()):
                self.test_sets[name] = self._ood(name, size, 3 + i)
            self.test_sets.update(self.build_ood_sets())
