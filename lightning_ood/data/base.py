"""The DataModule contract of the project: a training loader, test loaders ``[ID test, *OOD sets]`` and a loader over
the training images with the test transform, from which the OOD statistics are fitted.

Evaluation loaders never pad or repeat samples under DDP (:class:`UnrepeatedDistributedSampler`): each image is
scored exactly once whatever the number of processes, so metrics equal the single-process ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_ood.data.ood import build_ood_set, download_ood_set, ood_entry
from lightning_ood.data.reproducible import EpochShuffle, SeededItems
from lightning_ood.data.transforms import eval_transform
from lightning_ood.errors import ConfigError, DataError

DATA_ROOT_ENV = "LIGHTNING_OOD_DATA"


def default_data_root() -> str:
    """``$LIGHTNING_OOD_DATA`` if set, else ``./data``."""
    return os.environ.get(DATA_ROOT_ENV, "data")


def default_num_workers() -> int:
    """One worker per core beyond the first (the main process computes), at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class IndexedDataset(Dataset):
    """Wrap a dataset so items become ``(image, label, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


class OODDataModule(LightningDataModule):
    """Base class: subclasses build ``train_set``, the ID test set and ``statistics_set`` in ``setup``; the OOD test
    sets come from the registry (:mod:`lightning_ood.data.ood`) through :meth:`build_ood_sets`.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of the test and statistics loaders (defaults to ``batch_size``).
        num_workers: loader worker processes; ``None`` picks one per core beyond the first (at most 8).
        ood: OOD test sets, each a registered name (``mnist``) or a mapping ``{name: tin, root: ..., label: ...}``
            with the set's options (see :mod:`lightning_ood.data.ood`).
        ood_root: folder holding the OOD sets in their default sub-folders (defaults to the data root).
        download: let ``prepare_data`` download missing data where torchvision can.
        skip_missing_ood: skip an OOD set whose data is missing, with a warning (the result table lists it),
            instead of failing.
    """

    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    image_size: int

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        ood: list[str | dict[str, Any]] | None = None,
        ood_root: str | None = None,
        download: bool = True,
        skip_missing_ood: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.ood = list(ood or [])
        self.ood_root = Path(ood_root or default_data_root()).expanduser()
        self.download = download
        self.skip_missing_ood = skip_missing_ood
        self.skipped_ood: dict[str, str] = {}
        self.skipped_images: dict[str, int] = {}
        self.train_set: Dataset | None = None
        self.test_sets: dict[str, Dataset] = {}
        self.statistics_set: Dataset | None = None

    def prepare_ood_sets(self) -> None:
        """Download the configured OOD sets that are missing, where torchvision can (call from ``prepare_data``)."""
        if not self.download:
            return
        for entry in self.ood:
            label, name, options = ood_entry(entry)
            try:
                download_ood_set(name, self.ood_root, options.get("root"))
            except DataError as err:
                if not self.skip_missing_ood:
                    raise
                rank_zero_warn(f"Skipping OOD set {label!r}: {err}")

    def ood_transform(self) -> Callable:
        """The transform of the OOD images: resized to the ID resolution and normalised like the ID test images
        (subclasses whose test transform crops, as ImageNet's, override it)."""
        return eval_transform(self.mean, self.std, self.image_size)

    def build_ood_sets(self) -> dict[str, Dataset]:
        """The configured OOD sets by display name, transformed by :meth:`ood_transform`."""
        transform = self.ood_transform()
        shape = (3, self.image_size, self.image_size)
        sets: dict[str, Dataset] = {}
        self.skipped_ood, self.skipped_images = {}, {}
        for entry in self.ood:
            label, name, options = ood_entry(entry)
            if label in sets or label == self.id_name:
                raise ConfigError(f"OOD set name {label!r} is used twice; give one of them a distinct 'label'.")
            try:
                dataset = build_ood_set(name, transform, shape, self.ood_root, **options)
                if len(dataset) == 0:
                    raise DataError(f"OOD set {label!r} is empty.")
            except DataError as err:
                if not self.skip_missing_ood:
                    raise
                rank_zero_warn(f"Skipping OOD set {label!r}: {err}")
                self.skipped_ood[label] = str(err).split(". ")[0]
                continue
            sets[label] = dataset
            if getattr(dataset, "skipped", None):
                self.skipped_images[label] = len(dataset.skipped)
        if self.ood and not sets:
            raise DataError(f"None of the configured OOD sets could be loaded: {', '.join(self.skipped_ood)}.")
        return sets

    def validation_set(self, size: int = 2000, seed: int = 0) -> Dataset:
        """A seeded random subset of the training images with the test transform: the ID side of hyperparameter
        selection (the test set stays untouched)."""
        if self.statistics_set is None:
            self.setup("statistics")
        n = len(self.statistics_set)
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]
        return Subset(self.statistics_set, indices.sort().values.tolist())

    # ---------------------------------------------------------------- names
    @property
    def id_name(self) -> str:
        """Name of the in-distribution test set (first test loader)."""
        raise NotImplementedError

    @property
    def test_set_names(self) -> list[str]:
        """Names of the test loaders in order: the ID set, then each OOD set."""
        return list(self.test_sets)

    # ---------------------------------------------------------------- loaders
    def eval_loader(self, dataset: Dataset) -> DataLoader:
        """An ordered loader that, under DDP, gives each rank a disjoint share of the samples without padding."""
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches whose order and augmentation depend only on (seed, epoch): resuming is exact."""
        assert self.train_set is not None, "setup('fit') builds the training set"
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything (the CLI's seed_everything)
        sampler = EpochShuffle(len(self.train_set), seed, self._epoch_in_progress)
        return DataLoader(
            SeededItems(self.train_set, seed),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _epoch_in_progress(self) -> int:
        """The epoch the training loop is about to run. Lightning creates a resumed run's first iterator before it
        advances ``current_epoch`` past the epoch the checkpoint ended; ``processed`` already counts it."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def test_dataloader(self) -> list[DataLoader]:
        return [self.eval_loader(dataset) for dataset in self.test_sets.values()]

    def statistics_dataloader(self) -> DataLoader:
        """Training images with the test transform, in order, as ``(image, label, index)``: the input of the
        statistics pass."""
        if self.statistics_set is None:
            self.setup("statistics")
        return self.eval_loader(IndexedDataset(self.statistics_set))
