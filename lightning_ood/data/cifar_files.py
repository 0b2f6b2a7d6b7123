"""CIFAR-10/100 on disk: torchvision's files or an image-folder copy ``<root>/{train,test}/<class>/<image>``, and the
writability check of a download. Below the DataModules and the OOD registry, which both read CIFAR splits.

An image-folder copy names its class folders after the dataset's classes (``airplane`` ... ``truck``; CIFAR-100's 100
fine names, ``apple`` ... ``worm``): a label is the folder's sorted position, which for these names is the label of
torchvision's files and of published checkpoints. Folders named otherwise are refused by name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets import CIFAR10, CIFAR100, VisionDataset

from lightning_ood.data.folders import check_image_folder, has_split_folders, labelled_image_folder
from lightning_ood.errors import DataError

DATA_ROOT_ENV = "LIGHTNING_OOD_DATA"


# The class names in label order (as in the datasets' meta files; sorted, so the sorted folder position is the label).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)  # fmt: skip


@dataclass(frozen=True)
class CifarSpec:
    title: str
    torchvision_class: type[VisionDataset]
    classes: tuple[str, ...]  # the class names in label order: the class folders of an image-folder copy
    folder: str  # torchvision's extracted folder name under the root
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


CIFAR = {
    "cifar10": CifarSpec(
        "CIFAR-10", CIFAR10, CIFAR10_CLASSES, "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html"
    ),
    "cifar100": CifarSpec(
        "CIFAR-100", CIFAR100, CIFAR100_CLASSES, "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar.html"
    ),
}


def is_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def check_writable(root: Path, what: str) -> None:
    """Raise a :class:`DataError` when a download into ``root`` could not be written."""
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(
            f"{what}: cannot download into {root}: {existing} is a file, not a folder. Give a folder as the data root "
            f"(--data.root or ${DATA_ROOT_ENV}; an OOD set's: --data.ood_root or its root)."
        )
    if not is_writable(existing):
        raise DataError(
            f"{what}: cannot download into {root}: {existing} is not writable. Choose a writable data root "
            f"(--data.root or ${DATA_ROOT_ENV}) or place the files there by hand."
        )


def check_cifar_folders(name: str, root: Path) -> None:
    """Refuse an image-folder copy under ``root`` whose class folders (either split) are not the dataset's classes,
    before any work (``prepare_data``); torchvision's files and a missing root are left to :func:`cifar_split`."""
    spec = CIFAR[name]
    if has_split_folders(root):
        check_image_folder(root, spec.num_classes, spec.title, spec.classes)


def cifar_split(
    name: str, root: Path, train: bool, transform, download: bool = False, bad_images: str = "error"
) -> VisionDataset:
    """One split of CIFAR-10/100 from an image-folder copy (class folders named after the classes, both splits
    checked) or torchvision's files under ``root``."""
    spec = CIFAR[name]
    if has_split_folders(root):
        split = "train" if train else "test"
        return labelled_image_folder(root, split, transform, spec.num_classes, spec.title, bad_images, spec.classes)
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
