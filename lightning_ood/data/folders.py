"""Image-folder datasets with validation that names the path and the expected layout when something is off.

A label is the sorted position of its class folder, so the class folders of a split are checked by name before any
image is read: against the dataset's class names where they are known (CIFAR), and those of ``test/`` against those
of ``train/`` in any case, so that both splits label alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def few(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` names, then how many more: ``a, b, c, d, e and 7 more``."""
    listed = ", ".join(names[:shown])
    return f"{listed} and {len(names) - shown} more" if len(names) > shown else listed


def name_differences(found: Sequence[str], expected: Sequence[str], extra: str, missing: str) -> str:
    """``"<extra> a, b; <missing> c"``: the names in ``found`` but not in ``expected`` and the reverse, sorted; empty
    when both hold the same names."""
    only_found = sorted(set(found) - set(expected))
    only_expected = sorted(set(expected) - set(found))
    parts = [f"{extra} {few(only_found)}"] if only_found else []
    parts += [f"{missing} {few(only_expected)}"] if only_expected else []
    return "; ".join(parts)


def check_class_names(split_dir: Path, classes: Sequence[str], class_names: Sequence[str], dataset_name: str) -> None:
    """Raise a :class:`DataError` naming the class folders of ``split_dir`` that are not among the dataset's
    ``class_names`` and the class names that have no folder."""
    differences = name_differences(classes, class_names, "unexpected", "missing")
    if differences:
        raise DataError(
            f"{dataset_name}: the class folders of {split_dir} are not {dataset_name}'s classes: {differences}. Name "
            f"the class folders after {dataset_name}'s classes ({few(class_names, 3)}): a label is its folder's "
            f"sorted position."
        )


def check_same_classes(root: Path, train: Sequence[str], test: Sequence[str], dataset_name: str) -> None:
    """Raise a :class:`DataError` naming the class folders that only one of ``root/train`` and ``root/test`` has."""
    differences = name_differences(test, train, "only in test/:", "only in train/:")
    if differences:
        raise DataError(
            f"{dataset_name}: the class folders of {root / 'test'} differ from those of {root / 'train'}: "
            f"{differences}. Both splits need the same class folders: a label is its folder's sorted position."
        )


def check_split_classes(
    root: Path, split: str, classes: Sequence[str], dataset_name: str, class_names: Sequence[str] | None = None
) -> None:
    """Check the class folders of ``root/<split>`` (``classes``) and of the other split (``train`` / ``test``) when it
    is there: against ``class_names`` when the dataset's are known, else ``test/``'s against ``train/``'s."""
    other = {"train": "test", "test": "train"}.get(split)
    other_classes = class_folders(root / other) if other is not None and (root / other).is_dir() else []
    if class_names is not None:
        for folder, names in ((split, classes), (other, other_classes)):
            if names:
                check_class_names(root / folder, names, class_names, dataset_name)
    elif other_classes:
        by_split = {split: classes, other: other_classes}
        check_same_classes(root, by_split["train"], by_split["test"], dataset_name)


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


def split_classes(
    root: Path,
    split: str,
    expected_classes: int | None = None,
    dataset_name: str = "dataset",
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """The sorted class folders of ``root/<split>``, checked without reading an image.

    Raises:
        DataError: the split folder is missing, holds no class folders with images, or holds a number of classes
            other than ``expected_classes``; the class folders of a split are not ``class_names`` (when given), or
            those of ``test/`` differ from those of ``train/`` (see :func:`check_split_classes`).
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
        differences = name_differences(classes, class_names, "unexpected", "missing") if class_names else ""
        raise DataError(
            f"{dataset_name}: {split_dir} has {len(classes)} class folders but {dataset_name} has {expected_classes} "
            f"classes{f' ({differences})' if differences else ''}. Point the data root at a complete copy laid out "
            f"{layout}."
        )
    check_split_classes(root, split, classes, dataset_name, class_names)
    return classes


def check_image_folder(
    root: Path,
    expected_classes: int | None = None,
    dataset_name: str = "dataset",
    class_names: Sequence[str] | None = None,
) -> None:
    """The checks of :func:`split_classes` on each split of ``root`` that holds class folders: for ``prepare_data``,
    before a run writes anything (``setup`` checks again when it reads a split, on every rank)."""
    for split in ("train", "test"):
        if (root / split).is_dir() and class_folders(root / split):
            split_classes(root, split, expected_classes, dataset_name, class_names)


def labelled_image_folder(
    root: Path,
    split: str,
    transform: Callable | None,
    expected_classes: int | None = None,
    dataset_name: str = "dataset",
    bad_images: str = "error",
    class_names: Sequence[str] | None = None,
) -> CheckedImageFolder:
    """``root/<split>/<class>/<image>`` as an image folder; the class index is the sorted folder position. The class
    folders are checked first (:func:`split_classes`), which raises a :class:`DataError` naming what is off."""
    split_classes(root, split, expected_classes, dataset_name, class_names)
    return CheckedImageFolder(str(root / split), transform, bad_images, f"{dataset_name} {split}")
