"""CIFAR-10/100 on disk: torchvision's files or an image-folder copy ``<root>/{train,test}/<class>/<image>``, and the
writability check of a download. Below the DataModules and the OOD registry, which both read CIFAR splits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets import CIFAR10, CIFAR100, VisionDataset

from lightning_ood.data.folders import has_split_folders, labelled_image_folder
from lightning_ood.errors import DataError

DATA_ROOT_ENV = "LIGHTNING_OOD_DATA"


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
