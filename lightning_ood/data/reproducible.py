"""Training data order and augmentation that depend only on (seed, epoch, index).

A run killed mid-training and resumed from its last checkpoint then sees exactly the batches, and exactly the random
crops and flips, that an uninterrupted run sees, whatever the number of loader workers (each worker used to draw its
augmentation from a seed taken from the global RNG when its iterator was created, which a restart changes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from lightning_ood.checks import SEED_MAX, check_seed  # noqa: F401  (the data modules' seeds)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one (run seed, epoch, sample) triple."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + index) % (2**63 - 1)


class EpochShuffle(Sampler):
    """A permutation of ``range(size)`` seeded by ``(seed, epoch())``, yielding ``(index, epoch)`` pairs.

    ``epoch`` is read when iteration starts (for example ``lambda: trainer.current_epoch``), so a resumed run draws
    the permutation of the epoch it resumes in.
    """

    def __init__(self, size: int, seed: int, epoch: Callable[[], int]) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.epoch())
        generator = torch.Generator().manual_seed(item_seed(self.seed, epoch, -1))
        for index in torch.randperm(self.size, generator=generator).tolist():
            yield index, epoch


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(index, epoch)`` runs its transform under the seed ``(seed, epoch, index)``;
    a plain integer index behaves as epoch 0."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self.dataset[index]
