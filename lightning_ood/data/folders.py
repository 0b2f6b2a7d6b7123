"""Image-folder datasets with validation that names the path and the expected layout when something is off."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_ood.data.images import check_bad_images, decodable, decode_image
from lightning_ood.errors import DataError


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` that hold at least one image."""
    return sorted(
        d.name
        for d in split_dir.iterdir()
        if d.is_dir() and any(f.suffix.lower() in IMG_EXTENSIONS for f in d.iterdir() if f.is_file())
    )


def has_split_folders(root: Path, splits: tuple[str, ...] = ("train", "test")) -> bool:
    """Whether ``root`` looks like an image-folder copy: any of ``root/<split>/`` exists."""
    return any((root / split).is_dir() for split in splits)


class CheckedImageFolder(ImageFolder):
    """An :class:`ImageFolder` whose images are read by :func:`~lightning_ood.data.images.decode_image` (high bit
    depths converted, failures naming the file); with ``bad_images: skip`` the files that do not decode are left out
    up front (``skipped`` lists them)."""

    def __init__(self, root: str, transform: Callable | None = None, bad_images: str = "error", what: str = "") -> None:
        super().__init__(root, transform=transform, loader=decode_image)
        self.skipped: list[Path] = []
        if check_bad_images(bad_images, what or root) == "skip":
            kept, self.skipped = decodable([Path(p) for p, _ in self.samples], what or root)
            self.samples = [self.samples[i] for i in kept]
            self.imgs = self.samples
            self.targets = [t for _, t in self.samples]


def labelled_image_folder(
    root: Path,
    split: str,
    transform: Callable | None,
    expected_classes: int | None = None,
    dataset_name: str = "dataset",
    bad_images: str = "error",
) -> CheckedImageFolder:
    """``root/<split>/<class>/<image>`` as an image folder; the class index is the sorted folder position.

    Raises:
        DataError: the split folder is missing, holds no class folders with images, or holds a number of classes
            other than ``expected_classes``.
    """
    split_dir = root / split
    layout = f"'{root}/{{train,test}}/<class>/<image>'"
    if not split_dir.is_dir():
        raise DataError(f"{dataset_name}: missing folder {split_dir}. An image-folder copy must be laid out {layout}.")
    classes = class_folders(split_dir)
    if not classes:
        raise DataError(
            f"{dataset_name}: {split_dir} has no class folders with images (extensions {', '.join(IMG_EXTENSIONS)}). "
            f"Expected layout: {layout}."
        )
    if expected_classes is not None and len(classes) != expected_classes:
        raise DataError(
            f"{dataset_name}: {split_dir} has {len(classes)} class folders but {dataset_name} has {expected_classes} "
            f"classes. Point the data root at a complete copy laid out {layout}."
        )
    return CheckedImageFolder(str(split_dir), transform, bad_images, f"{dataset_name} {split}")
