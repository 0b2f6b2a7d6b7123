"""CIFAR-10/100 as the in-distribution data: torchvision's files (downloaded when missing and allowed) or an
image-folder copy laid out ``<root>/{train,test}/<class>/<image>`` (for example ``../shared/data/cifar10-jpeg``),
decoded once into tensors and augmented on the training device (``pipeline: tensor``, the default; see
:mod:`lightning_ood.data.tensors`) or read through PIL image by image (``pipeline: pil``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.data.base import DATA_ARGS, OODDataModule, default_data_root
from lightning_ood.data.cifar_files import CIFAR, DATA_ROOT_ENV, check_cifar_folders, check_writable, cifar_split
from lightning_ood.data.folders import has_split_folders
from lightning_ood.data.sets import dataset_files
from lightning_ood.data.tensors import DECODER, DecodedImages, TrainingImages, decode_files
from lightning_ood.data.transforms import NORMALIZATION, cifar_train_transform, eval_transform
from lightning_ood.errors import ConfigError, DataError, unknown_name
from lightning_ood.io import check_writable_folder, remove_empty_folders

PIPELINES = ("tensor", "pil")


class CIFARDataModule(OODDataModule):
    """CIFAR-10 or CIFAR-100 for training, testing and fitting OOD statistics.

    Args:
        dataset: ``cifar10`` or ``cifar100``.
        root: folder holding torchvision's extracted files, or an image-folder copy ``<root>/{train,test}/<class>/``;
            defaults to ``$LIGHTNING_OOD_DATA`` or ``./data``.
        pipeline: ``tensor`` (images decoded once into a uint8 tensor shared by training, statistics and the ID test,
            augmented per image on the training device) or ``pil`` (decoded and augmented with PIL image by image,
            in loader workers).
        decoded_cache: folder keeping an image folder's decoded tensor for the next run (keyed by the files' paths,
            sizes and modification times, checksummed); ``None`` decodes at every start. torchvision's files are
            arrays already.
        **kwargs: the loader, OOD-set and statistics arguments of :class:`~lightning_ood.data.base.OODDataModule`
            (``batch_size`` (the paper: 128), ``eval_batch_size``, ``num_workers``, ``ood``, ``ood_root``,
            ``download``, ``skip_missing_ood``, ``train_per_class``, ``val_split``, ``bad_images``).
    """

    image_size = 32

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str | None = None,
        pipeline: str = "tensor",
        decoded_cache: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if dataset not in CIFAR:
            raise unknown_name("dataset", dataset, CIFAR)
        if pipeline not in PIPELINES:
            raise ConfigError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}.")
        self.pipeline = pipeline
        self.decoded_cache = decoded_cache
        self._decoded: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self._files: dict[bool, list[str]] = {}  # the image files of a decoded split (image folders)
        self.dataset = dataset
        self.spec = CIFAR[dataset]
        self.root = Path(root or default_data_root()).expanduser()
        self.num_classes = self.spec.num_classes
        self.default_normalization = NORMALIZATION[dataset]

    @property
    def id_name(self) -> str:
        return self.dataset

    def prepare_data(self) -> None:
        check_cifar_folders(self.dataset, self.root)  # before the run writes anything; setup checks on every rank
        if self.decoded_cache is not None:  # before any image is decoded
            check_writable_folder(self.decoded_cache, f"{DATA_ARGS}decoded_cache")
        self.prepare_ood_sets()
        if has_split_folders(self.root) or (self.root / self.spec.folder).is_dir() or not self.download:
            return
        check_writable(self.root, self.spec.title)
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]  # what the download would create
        try:
            self.spec.torchvision_class(str(self.root), train=True, download=True)
            self.spec.torchvision_class(str(self.root), train=False, download=True)
        except OSError as err:  # URLError, timeouts, disk errors
            remove_empty_folders(missing)  # leave no empty folders behind
            raise DataError(
                f"{self.spec.title} is not under {self.root} and downloading it failed ({err}). Without network "
                f"access, copy the data there by hand (source {self.spec.source}) or set --data.root / "
                f"${DATA_ROOT_ENV} to an existing copy."
            ) from err

    def decoded(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 images (N, 3, 32, 32), labels (N,))`` of a split, decoded once per run (or from the cache)."""
        if train not in self._decoded:
            split = cifar_split(self.dataset, self.root, train, None, self.download, self.bad_images)
            name = f"{self.dataset}_{'train' if train else 'test'}"
            if hasattr(split, "data"):  # torchvision's arrays (N, H, W, 3)
                images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
            else:
                paths = self._files[train] = [path for path, _ in split.samples]
                images = self.decode_folder(name, paths)
                self.count_skipped(self.dataset if not train else f"{self.dataset} (training)", split)
            if tuple(images.shape[2:]) != (self.image_size, self.image_size):
                raise DataError(
                    f"{self.spec.title} under {self.root}: the images are {images.shape[3]}x{images.shape[2]}, CIFAR's "
                    f"are {self.image_size}x{self.image_size}. Resize the copy to {self.image_size}x{self.image_size}."
                )
            self._decoded[train] = (images, torch.as_tensor(split.targets, dtype=torch.long))
        return self._decoded[train]

    def decode_folder(self, name: str, paths: list[str]) -> torch.Tensor:
        if self.decoded_cache is None:
            return decode_files(paths, f"Decoding {name}")
        from lightning_ood.features import FeatureCache, files_digest

        cache = FeatureCache(self.decoded_cache)
        key = hashlib.sha256(f"{DECODER}|{files_digest(paths)}".encode()).hexdigest()[:24]
        stored, hit = cache.get_or_compute(
            f"decoded_{name}", key, lambda: {"images": decode_files(paths, f"Decoding {name}")}
        )
        if hit:
            rank_zero_info(f"{name}: {len(paths)} decoded images from the cache in {self.decoded_cache}.")
        return stored["images"]

    def setup(self, stage: str | None = None) -> None:
        if self.pipeline == "tensor":
            self.setup_tensors(stage)
            return
        test_tf = eval_transform(self.normalization)
        bad = self.bad_images
        if stage in (None, "fit") and self.train_set is None:
            train_tf = cifar_train_transform(self.normalization)
            self.train_set = cifar_split(self.dataset, self.root, True, train_tf, False, bad)
        if stage in (None, "test", "validate", "predict") and not self.test_sets:
            id_test = cifar_split(self.dataset, self.root, False, test_tf, self.download, bad)
            ood_sets = self.build_ood_sets(dataset_files(id_test))
            self.test_sets = {self.dataset: self.count_skipped(self.dataset, id_test), **ood_sets}
        if stage in (None, "fit", "statistics") and self.statistics_set is None:
            statistics = cifar_split(self.dataset, self.root, True, test_tf, self.download, bad)
            self.statistics_set = self.count_skipped(f"{self.dataset} (training)", statistics)

    def setup_tensors(self, stage: str | None) -> None:
        """The tensor pipeline: one decoded tensor per split, shared by training, statistics and testing."""
        if stage in (None, "fit", "statistics") and (self.train_set is None or self.statistics_set is None):
            images, targets = self.decoded(True)
            self.train_set = TrainingImages(images, targets)
            self.statistics_set = DecodedImages(images, targets, self.normalization)
        if stage in (None, "test", "validate", "predict") and not self.test_sets:
            images, targets = self.decoded(False)
            id_test = DecodedImages(images, targets, self.normalization)
            self.test_sets = {self.dataset: id_test, **self.build_ood_sets(self._files.get(False, []))}
