"""The DataModule contract of the project: a training loader, test loaders ``[ID test, *OOD sets]`` and a loader over
the training images with the test transform, from which the OOD statistics are fitted.

Evaluation loaders never pad or repeat samples under DDP (:class:`UnrepeatedDistributedSampler`): each image is
scored exactly once whatever the number of processes, so metrics equal the single-process ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_ood.data.cifar_files import DATA_ROOT_ENV
from lightning_ood.data.folders import few
from lightning_ood.data.images import check_bad_images
from lightning_ood.data.ood import build_ood_set, check_ood_set, download_ood_set, ood_entry, ood_group, ood_spec
from lightning_ood.data.reproducible import EpochShuffle, SeededItems, check_seed
from lightning_ood.data.sets import dataset_files
from lightning_ood.data.tensors import RawBatch, TrainingImages, crop_and_flip, normalize_uint8, pass_batch
from lightning_ood.data.transforms import InputNormalization, Normalization, eval_transform
from lightning_ood.errors import ConfigError, DataError


def default_data_root() -> str:
    """``$LIGHTNING_OOD_DATA`` if set, else ``./data``."""
    return os.environ.get(DATA_ROOT_ENV, "data")


def default_num_workers() -> int:
    """One worker per core beyond the first (the main process computes), at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


DATA_ARGS = "--data.init_args."  # how the CLI spells a DataModule argument, for messages


def check_at_least(name: str, value: int | float | None, minimum: int, null: str | None = None) -> None:
    """Raise a :class:`ConfigError` naming the data argument ``name`` when ``value`` is below ``minimum``; ``None``
    passes where it has a meaning, which ``null`` states (``"all images"``)."""
    if value is None and null is not None:
        return
    if value is None or value < minimum:
        allowed = f">= {minimum} or null ({null})" if null is not None else f">= {minimum}"
        raise ConfigError(f"{DATA_ARGS}{name} must be {allowed}, got {value}.")


def check_ood_entries(entries: list[str | dict[str, Any]]) -> None:
    """Refuse, before any data is read, an OOD entry without a name, an unregistered set, a size below 1 and a seed
    outside 0..2^32 - 1."""
    for entry in entries:
        check_ood_entry(entry, f"{DATA_ARGS}ood")


def check_ood_entry(entry: str | dict[str, Any], where: str) -> None:
    """The checks of :func:`check_ood_entries` on one entry; ``where`` names the argument that holds it."""
    label, name, options = ood_entry(entry)
    ood_spec(name)
    size = options.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(f"{where}: the size of OOD set {label!r} must be an integer >= 1, got {size!r}.")
    if "seed" in options:
        check_seed(f"{where}: the seed of OOD set {label!r}", options["seed"])


def check_not_id_images(label: str, dataset: Dataset, id_test: set[str], id_name: str) -> None:
    """Refuse an OOD set that holds images of the ID test set (``id_test``: their resolved paths)."""
    if not id_test:
        return
    shared = [path for path in dataset_files(dataset) if os.path.realpath(path) in id_test]
    if shared:
        raise ConfigError(
            f"OOD set {label!r} holds {len(shared)} of the {len(id_test)} {id_name} test images (first: "
            f"{few([str(p) for p in shared], 3)}): they would be scored as ID and as OOD at once. Remove them from "
            f"its image list, or point its root at other images."
        )


class IndexedDataset(Dataset):
    """Wrap a dataset so items become ``(image, label, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


def dataset_labels(dataset: Dataset) -> list[int]:
    """The label of every item, in order, without decoding images where the dataset lists them (``targets``)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def seeded_subset(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
    """``min(size, len(dataset))`` items drawn by a permutation seeded by ``seed``, in dataset order."""
    permutation = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(permutation[:size].tolist()))


def first_per_class(dataset: Dataset, per_class: int | None) -> Dataset:
    """The first ``per_class`` items of each class in the dataset's order (sorted file names for image folders,
    the distributed order for torchvision's files); the dataset itself when ``per_class`` is ``None``."""
    if per_class is None:
        return dataset
    seen: dict[int, int] = {}
    keep = []
    for index, label in enumerate(dataset_labels(dataset)):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(index)
    return Subset(dataset, keep)


def attach_normalization(module, datamodule: OODDataModule) -> Normalization:
    """Make ``datamodule`` normalise with the model's normalisation; a model that has none yet (trained here, no
    published weights) adopts the dataset's default, so it is stored with its checkpoints."""
    value = datamodule.use_normalization(getattr(module, "input_normalization", None))
    if module is not None and hasattr(module, "input_normalization") and module.input_normalization is None:
        module.input_normalization = value
    return value


class OODDataModule(LightningDataModule):
    """Base class: subclasses build ``train_set``, the ID test set and ``statistics_set`` in ``setup``; the OOD test
    sets come from the registry (:mod:`lightning_ood.data.ood`) through :meth:`build_ood_sets`.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of the test, validation and statistics loaders; ``None`` (the default) uses
            ``batch_size``.
        num_workers: loader worker processes; ``None`` picks one per core beyond the first (at most 8).
        ood: OOD test sets, each a registered name (``mnist``) or a mapping ``{name: tin, root: ..., label: ...,
            group: near}`` with the set's options (see :mod:`lightning_ood.data.ood`); sets of one ``group`` are
            averaged together in the tables (OpenOOD's near- and far-OOD).
        ood_root: folder holding the OOD sets in their default sub-folders (defaults to the data root).
        download: let ``prepare_data`` download missing data where torchvision can.
        skip_missing_ood: skip an OOD set whose data is missing, with a warning (the result table lists it),
            instead of failing.
        train_per_class: fit the OOD statistics on the first N training images of each class only (sorted file
            order for image folders, the distributed order for torchvision's files); ``None`` uses all of them, as
            the paper.
        val_split: hold out this many training images (a permutation seeded by ``val_seed``): they are used neither
            for training nor for the OOD statistics, and they are the ID validation images of ``validate`` (accuracy
            during ``fit`` too) and of ``tune``. 0 (the default, as the paper) trains on every image.
        val_seed: seed of the held-out images.
        bad_images: what an undecodable ID image (training or test) does: ``error`` stops the run naming the file;
            ``skip`` decodes every file once up front and leaves out those that fail, with a warning and a count
            under the result table (OOD sets take their own ``bad_images`` option).

    Subclasses set ``default_normalization`` (the dataset's own statistics); the normalisation in force is the
    model's when the model has one (published weights bring theirs), read again each time a loader is made.
    """

    num_classes: int
    image_size: int
    default_normalization: Normalization

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        ood: list[str | dict[str, Any]] | None = None,
        ood_root: str | None = None,
        download: bool = True,
        skip_missing_ood: bool = False,
        train_per_class: int | None = None,
        val_split: int = 0,
        val_seed: int = 0,
        bad_images: str = "error",
    ):
        super().__init__()
        check_bad_images(bad_images, "data")
        check_at_least("batch_size", batch_size, 1)
        check_at_least("eval_batch_size", eval_batch_size, 1, null="the training batch size")
        check_at_least("num_workers", num_workers, 0, null="one per core beyond the first, at most 8")
        check_at_least("train_per_class", train_per_class, 1, null="all images")
        check_at_least("val_split", val_split, 0)
        check_seed(f"{DATA_ARGS}val_seed", val_seed)
        check_ood_entries(list(ood or []))
        self.train_per_class = train_per_class
        self.val_split = val_split
        self.val_seed = val_seed
        if val_split:
            self.val_dataloader = self.validation_dataloader
        self.bad_images = bad_images
        self._normalization: InputNormalization | None = None
        self._announced: Normalization | None = None
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.ood = list(ood or [])
        self.ood_root = Path(ood_root or default_data_root()).expanduser()
        self.download = download
        self.skip_missing_ood = skip_missing_ood
        self.skipped_ood: dict[str, str] = {}
        self.ood_groups: dict[str, str] = {}  # OOD set label -> group (near, far)
        self.skipped_images: dict[str, int] = {}
        self.train_set: Dataset | None = None
        self.test_sets: dict[str, Dataset] = {}
        self.statistics_set: Dataset | None = None

    def prepare_ood_sets(self) -> None:
        """Download the configured OOD sets that are missing, where torchvision can, and check the layout of those
        that have a cheap check (CIFAR's class folders) before the run writes anything (call from ``prepare_data``)."""
        for entry in self.ood:
            label, name, options = ood_entry(entry)
            try:
                if self.download:
                    download_ood_set(name, self.ood_root, options.get("root"))
                check_ood_set(name, self.ood_root, options.get("root"))
            except DataError as err:
                if not self.skip_missing_ood:
                    raise
                rank_zero_warn(f"Skipping OOD set {label!r}: {err}")

    # ---------------------------------------------------------------- normalisation
    @property
    def normalization(self) -> InputNormalization:
        """The normalisation in force, shared by every transform this DataModule builds."""
        if self._normalization is None:
            self._normalization = InputNormalization(self.default_normalization)
        return self._normalization

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.normalization.value.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.normalization.value.std

    def use_normalization(self, normalization: Normalization | None) -> Normalization:
        """Normalise every image with ``normalization`` from now on (``None``: the dataset's default); logs the
        values once per change. Returns the normalisation in force."""
        value = normalization or self.default_normalization
        self.normalization.value = value
        if value != self._announced:
            rank_zero_info(f"Input normalisation: {value.describe()}.")
            self._announced = value
        return value

    def sync_normalization(self) -> Normalization:
        """Take the normalisation of the model attached to the trainer (called whenever a loader is made, so it
        also holds after a checkpoint was loaded)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:  # used outside a Trainer run: keep what was set (use_normalization)
            return self.use_normalization(self.normalization.value)
        return attach_normalization(module, self)

    def ood_transform(self) -> Callable:
        """The transform of the OOD images: resized to the ID resolution and normalised like the ID test images
        (subclasses whose test transform crops, as ImageNet's, override it)."""
        return eval_transform(self.normalization, self.image_size)

    def describe_sets(self) -> dict[str, dict[str, Any]]:
        """Each test set's size and where it comes from (for the result files' provenance)."""
        described = {}
        for label, dataset in self.test_sets.items():
            entry = next((e for e in self.ood if ood_entry(e)[0] == label), None)
            if entry is None:  # the ID test set
                source = str(getattr(self, "root", "")) or type(dataset).__name__
            else:
                _, name, options = ood_entry(entry)
                source = ", ".join([name, *(f"{k}={v}" for k, v in options.items())])
            described[label] = {"images": len(dataset), "source": source}
        return described

    def count_skipped(self, label: str, dataset: Dataset) -> Dataset:
        """Record the undecodable images a dataset left out (``bad_images: skip``) under ``label``."""
        if getattr(dataset, "skipped", None):
            self.skipped_images[label] = len(dataset.skipped)
        return dataset

    def build_ood_sets(self, id_files: Iterable[str | Path] = ()) -> dict[str, Dataset]:
        """The configured OOD sets by display name, transformed by :meth:`ood_transform`. ``id_files``: the image files
        of the ID test set, when it has files; an OOD set that holds any of them is refused (those images would be
        scored as ID and as OOD at once)."""
        id_test = {os.path.realpath(p) for p in id_files}
        transform = self.ood_transform()
        shape = (3, self.image_size, self.image_size)
        sets: dict[str, Dataset] = {}
        self.skipped_ood = {}
        self.ood_groups = {}
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
            check_not_id_images(label, dataset, id_test, self.id_name)
            sets[label] = self.count_skipped(label, dataset)
            if ood_group(entry):
                self.ood_groups[label] = ood_group(entry)
        if self.ood and not sets:
            raise DataError(f"None of the configured OOD sets could be loaded: {', '.join(self.skipped_ood)}.")
        return sets

    # ---------------------------------------------------------------- training / held-out split
    def held_out(self, size: int | None = None, seed: int | None = None) -> list[int]:
        """Indices (into the training images) of the held-out ID validation images: ``size`` of a permutation seeded
        by ``seed`` (defaults: ``val_split``, ``val_seed``), sorted."""
        if self.statistics_set is None:
            self.setup("statistics")
        n = len(self.statistics_set)
        size = self.val_split if size is None else size
        if size >= n:
            raise ConfigError(f"Cannot hold out {size} of the {n} training images: choose fewer.")
        seed = self.val_seed if seed is None else seed
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return sorted(permutation[:size].tolist())

    def kept_indices(self, held_out: list[int] | None = None) -> list[int]:
        """Indices of the training images that are not held out."""
        held = set(self.held_out() if held_out is None else held_out)
        return [i for i in range(len(self.statistics_set)) if i not in held]

    def validation_set(self, size: int | None = None, seed: int | None = None) -> Dataset:
        """Held-out training images with the test transform (see :meth:`held_out`): the ID side of hyperparameter
        selection and of ``validate`` (the test set stays untouched)."""
        indices = self.held_out(size, seed)
        return Subset(self.statistics_set, indices)

    def id_validation_images(self, size: int) -> tuple[Dataset, str]:
        """The ID images a scorer's data-chosen quantities are fitted on (``reference: id_val``), never the test
        images, and a sentence saying which they are: the held-out training images of ``val_split`` (neither trained
        on nor in the OOD statistics), or without a split ``size`` training images (test transform, a permutation
        seeded by ``val_seed``), which a network trained on the whole training set has seen."""
        if self.val_split:
            images = self.validation_set()
            return images, (
                f"{len(images)} {self.id_name} training images held out by data.val_split (seed {self.val_seed}; "
                f"not trained on, not in the OOD statistics), none of them scored"
            )
        if self.statistics_set is None:
            self.setup("statistics")
        images = seeded_subset(self.statistics_set, size, self.val_seed)
        return images, (
            f"{len(images)} of the {len(self.statistics_set)} {self.id_name} training images (seed {self.val_seed}, "
            f"test transform; no data.val_split, so the network was trained on them), none of them scored"
        )

    def training_images(self) -> Dataset:
        """The training images (training transform) without the held-out ones."""
        assert self.train_set is not None, "setup('fit') builds the training set"
        if not self.val_split:
            return self.train_set
        if isinstance(self.train_set, TrainingImages):
            return self.train_set.subset(self.kept_indices())
        return Subset(self.train_set, self.kept_indices())

    def statistics_images_without(self, held_out: list[int]) -> Dataset:
        """The statistics images (see :attr:`statistics_images`) without ``held_out``."""
        return first_per_class(Subset(self.statistics_set, self.kept_indices(held_out)), self.train_per_class)

    def describe_statistics_images(self, held_out: int | None = None, seed: int | None = None) -> str:
        """Which training images the OOD statistics are fitted on, for provenance and staleness checks."""
        held_out = self.val_split if held_out is None else held_out
        seed = self.val_seed if seed is None else seed
        parts = [f"{self.id_name} training images"]
        if held_out:
            parts.append(f"{held_out} held out (seed {seed})")
        if self.train_per_class:
            parts.append(f"first {self.train_per_class} per class")
        return ", ".join(parts)

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
    @property
    def pin_memory(self) -> bool:
        """Pinned host memory for faster copies, when the run trains or evaluates on a CUDA device."""
        trainer = self.trainer
        if trainer is None:
            return False
        return trainer.strategy.root_device.type == "cuda"

    def eval_loader(self, dataset: Dataset, persistent: bool = False) -> DataLoader:
        """An ordered loader that, under DDP, gives each rank a disjoint share of the samples without padding; pinned
        memory on CUDA machines; ``persistent`` keeps its workers between epochs (the validation loader)."""
        self.sync_normalization()
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches whose order and augmentation depend only on (seed, epoch): resuming is exact."""
        self.sync_normalization()
        images = self.training_images()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything (the CLI's seed_everything)
        sampler = EpochShuffle(len(images), seed, self._epoch_in_progress)
        if isinstance(images, TrainingImages):  # in memory: batches gathered in the main process, augmented on device
            return DataLoader(images, batch_size=self.batch_size, sampler=sampler, collate_fn=pass_batch,
                              pin_memory=self.pin_memory)  # fmt: skip
        return DataLoader(
            SeededItems(images, seed),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches of the tensor pipeline, on the training device: per-image crop and flip, then the
        normalisation in force (see :mod:`lightning_ood.data.tensors`); every other batch as it is."""
        if isinstance(batch, RawBatch):
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            images = crop_and_flip(batch.images, seed, batch.epochs, batch.indices)
            return normalize_uint8(images, self.normalization.value), batch.labels
        return batch

    def _epoch_in_progress(self) -> int:
        """The epoch the training loop is about to run. Lightning creates a resumed run's first iterator before it
        advances ``current_epoch`` past the epoch the checkpoint ended; ``processed`` already counts it."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def test_dataloader(self) -> list[DataLoader]:
        """One ordered loader per test set, ID first, items ``(image, label, index)``: the index puts the scores of
        every process back in dataset order."""
        return [self.eval_loader(IndexedDataset(dataset)) for dataset in self.test_sets.values()]

    def validation_dataloader(self) -> DataLoader:
        """The held-out training images (``val_split``): Lightning's ``val_dataloader`` when ``val_split`` is set
        (without it the DataModule has no validation loader, and Lightning runs no validation)."""
        return self.eval_loader(self.validation_set(), persistent=True)

    def statistics_dataloader(self) -> DataLoader:
        """Training images with the test transform, in order, as ``(image, label, index)``: the input of the
        statistics pass."""
        return self.eval_loader(IndexedDataset(self.statistics_images))

    @property
    def statistics_images(self) -> Dataset:
        """The training images (test transform) the OOD statistics are fitted on: all but the held-out ones
        (``val_split``), or the first ``train_per_class`` of each class of those."""
        if self.statistics_set is None:
            self.setup("statistics")
        if self.val_split:
            return self.statistics_images_without(self.held_out())
        return first_per_class(self.statistics_set, self.train_per_class)
