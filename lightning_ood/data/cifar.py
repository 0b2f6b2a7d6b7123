"""CIFAR-10/100 as the in-distribution data: torchvision's files (downloaded when missing and allowed) or an
image-folder copy laid out ``<root>/{train,test}/<class>/<image>`` (for example ``../shared/data/cifar10-jpeg``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchvision.datasets import CIFAR10, CIFAR100, VisionDataset

from lightning_ood.data.base import DATA_ROOT_ENV, OODDataModule, default_data_root
from lightning_ood.data.folders import has_split_folders, labelled_image_folder
from lightning_ood.data.transforms import NORMALIZATION, cifar_train_transform, eval_transform
from lightning_ood.errors import DataError, unknown_name


@dataclass(frozen=True)
class CifarSpec:
    title: str
    torchvision_class: type[VisionDataset]
    num_classes: int
    folder: str  # torchvision's extracted folder name under the root
    source: str


CIFAR = {
    "cifar10": CifarSpec("CIFAR-10", CIFAR10, 10, "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": CifarSpec(
        "CIFAR-100", CIFAR100, 100, "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar.html"
    ),
}


def is_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def check_writable(root: Path, what: str) -> None:
    """Raise a :class:`DataError` when a download into ``root`` could not be written."""
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not is_writable(existing):
        raise DataError(
            f"{what}: cannot download into {root}: {existing} is not writable. Choose a writable data root "
            f"(--data.root or ${DATA_ROOT_ENV}) or place the files there by hand."
        )


def cifar_split(
    name: str, root: Path, train: bool, transform, download: bool = False, bad_images: str = "error"
) -> VisionDataset:
    """One split of CIFAR-10/100 from an image-folder copy or torchvision's files under ``root``."""
    spec = CIFAR[name]
    if has_split_folders(root):
        split = "train" if train else "test"
        return labelled_image_folder(root, split, transform, spec.num_classes, spec.title, bad_images)
    if not (root / spec.folder).is_dir():
        what = "found nothing" if not root.exists() else f"found neither '{spec.folder}/' nor 'train/' + 'test/'"
        hint = "the download failed or was disabled" if download else "download is disabled (--data.download false)"
        raise DataError(
            f"{spec.title} not found under {root} ({what}; {hint}). Either let torchvision download it there "
            f"(needs network access; source {spec.source}), set --data.root / ${DATA_ROOT_ENV} to where it is, or "
            f"point the root at an image-folder copy laid out <root>/{{train,test}}/<class>/<image>."
        )
    try:
        return spec.torchvision_class(str(root), train=train, transform=transform, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{spec.title} under {root / spec.folder} is incomplete or corrupted ({err}).") from err


class CIFARDataModule(OODDataModule):
    """CIFAR-10 or CIFAR-100 for training, testing and fitting OOD statistics.

    Args:
        dataset: ``cifar10`` or ``cifar100``.
        root: folder holding torchvision's extracted files, or an image-folder copy ``<root>/{train,test}/<class>/``;
            defaults to ``$LIGHTNING_OOD_DATA`` or ``./data``.
        **kwargs: the loader, OOD-set and statistics arguments of :class:`~lightning_ood.data.base.OODDataModule`
            (``batch_size`` (the paper: 128), ``eval_batch_size``, ``num_workers``, ``ood``, ``ood_root``,
            ``download``, ``skip_missing_ood``, ``train_per_class``).
    """

    image_size = 32

    def __init__(self, dataset: str = "cifar10", root: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dataset not in CIFAR:
            raise unknown_name("dataset", dataset, CIFAR)
        self.dataset = dataset
        self.spec = CIFAR[dataset]
        self.root = Path(root or default_data_root()).expanduser()
        self.num_classes = self.spec.num_classes
        self.default_normalization = NORMALIZATION[dataset]

    @property
    def id_name(self) -> str:
        return self.dataset

    def prepare_data(self) -> None:
        self.prepare_ood_sets()
        if has_split_folders(self.root) or (self.root / self.spec.folder).is_dir() or not self.download:
            return
        check_writable(self.root, self.spec.title)
        try:
            self.spec.torchvision_class(str(self.root), train=True, download=True)
            self.spec.torchvision_class(str(self.root), train=False, download=True)
        except OSError as err:  # URLError, timeouts, disk errors
            raise DataError(
                f"{self.spec.title} is not under {self.root} and downloading it failed ({err}). Without network "
                f"access, copy the data there by hand (source {self.spec.source}) or set --data.root / "
                f"${DATA_ROOT_ENV} to an existing copy."
            ) from err

    def setup(self, stage: str | None = None) -> None:
        test_tf = eval_transform(self.normalization)
        bad = self.bad_images
        if stage in (None, "fit") and self.train_set is None:
            train_tf = cifar_train_transform(self.normalization)
            self.train_set = cifar_split(self.dataset, self.root, True, train_tf, False, bad)
        if stage in (None, "test", "validate", "predict") and not self.test_sets:
            id_test = cifar_split(self.dataset, self.root, False, test_tf, self.download, bad)
            self.test_sets = {self.dataset: self.count_skipped(self.dataset, id_test), **self.build_ood_sets()}
        if stage in (None, "fit", "statistics") and self.statistics_set is None:
            statistics = cifar_split(self.dataset, self.root, True, test_tf, self.download, bad)
            self.statistics_set = self.count_skipped(f"{self.dataset} (training)", statistics)
