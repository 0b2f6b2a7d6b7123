"""ImageNet-1k as the in-distribution data of the large-scale benchmark (MOS, Huang & Li 2021; the paper's Table II).

- ID test: the 50,000 validation images, ``<root>/val/<wnid>/*.JPEG``.
- OOD statistics (class prototypes, ReAct percentiles, ...): the training images, ``<root>/train/<wnid>/*.JPEG``, with
  the test transform; all of them as in the paper, or the first ``train_per_class`` of each class (sorted names).
- Either split may instead be torchvision's archives in the root (``ILSVRC2012_devkit_t12.tar.gz`` +
  ``ILSVRC2012_img_{val,train}.tar``): torchvision's ``ImageNet`` extracts them once into the folders above.

Test images (ID and OOD) are resized to 256 and centre-cropped to 224, as in the paper and torchvision's evaluation.
ImageNet cannot be downloaded automatically (it needs a registration at image-net.org).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torchvision import transforms as T

from lightning_ood.data.base import DATA_ARGS, DATA_ROOT_ENV, OODDataModule, check_at_least, default_data_root
from lightning_ood.data.folders import CheckedImageFolder, class_folders
from lightning_ood.data.sets import dataset_files
from lightning_ood.data.transforms import NORMALIZATION, Normalize, to_rgb
from lightning_ood.errors import ConfigError, DataError

TITLE = "ImageNet-1k"
SOURCE = "https://image-net.org/download.php (registration required; no automatic download)"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}
LAYOUT = (
    "<root>/val/<wnid>/*.JPEG (ID test) and <root>/train/<wnid>/*.JPEG (OOD statistics), or torchvision's archives "
    f"<root>/{DEVKIT} + <root>/{ARCHIVES['val']} (+ <root>/{ARCHIVES['train']}), extracted on first use"
)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def imagenet_eval_transform(
    normalization, image_size: int = 224, resize_size: int = 256, interpolation: str = "bilinear"
) -> T.Compose:
    """RGB, shorter side resized to ``resize_size``, centre crop ``image_size``, tensor, normalisation."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.Resize(resize_size, interpolation=T.InterpolationMode(interpolation), antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            Normalize(normalization),
        ]
    )


def imagenet_train_transform(normalization, image_size: int = 224, interpolation: str = "bilinear") -> T.Compose:
    """torchvision's ImageNet training augmentation: random resized crop and horizontal flip."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode(interpolation), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            Normalize(normalization),
        ]
    )


class ImageNetDataModule(OODDataModule):
    """ImageNet-1k for testing (validation images), fitting OOD statistics (training images) and, if wanted, training.

    Args:
        root: folder holding ``train/`` and ``val/`` image folders (``<wnid>/*.JPEG``) or torchvision's archives;
            defaults to ``$LIGHTNING_OOD_DATA`` or ``./data``.
        image_size: side of the centre crop fed to the network (224; 384 for ViT-B/16 ``IMAGENET1K_SWAG_E2E_V1``).
        resize_size: the shorter side is resized to this before cropping (256; 384 for the SWAG weights).
        interpolation: resize interpolation, ``bilinear`` (torchvision's CNNs) or ``bicubic`` (the SWAG weights).
        batch_size: training batch size.
        **kwargs: the other arguments of :class:`~lightning_ood.data.base.OODDataModule` (``eval_batch_size``,
            ``num_workers``, ``ood`` (e.g. ``[inaturalist, sun, places, textures]``), ``ood_root``, ``download``
            (missing OOD sets torchvision can fetch, Textures; ImageNet itself and the MOS sets are never
            downloaded), ``skip_missing_ood``, ``train_per_class`` (the first N training images of each class, in
            sorted file order, for the OOD statistics; ``None``: all, as the paper), ``val_split``).
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        resize_size: int = 256,
        interpolation: str = "bilinear",
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}.")
        check_at_least("image_size", image_size, 1)
        if resize_size < image_size:  # the centre crop is taken from the resized image
            raise ConfigError(f"{DATA_ARGS}resize_size must be >= image_size ({image_size}), got {resize_size}.")
        self.root = Path(root or default_data_root()).expanduser()
        self.image_size = image_size
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.default_normalization = NORMALIZATION["imagenet"]
        self._classes: list[str] | None = None

    @property
    def id_name(self) -> str:
        return "imagenet"

    # ---------------------------------------------------------------- classes
    def split_classes(self, split: str) -> list[str]:
        """Sorted class folders (wnids) of ``<root>/<split>`` that hold images; empty when the folder is absent."""
        folder = self.root / split
        return class_folders(folder) if folder.is_dir() else []

    def has_archives(self, split: str) -> bool:
        return (self.root / DEVKIT).is_file() and (self.root / ARCHIVES[split]).is_file()

    @property
    def classes(self) -> list[str]:
        """The ID classes (wnids), read from the validation folder, else from the training folder."""
        if self._classes is None:
            self._classes = self.split_classes("val") or self.split_classes("train")
            if not self._classes:
                raise self.missing_error("found neither image folders nor torchvision's archives")
        return self._classes

    @property
    def num_classes(self) -> int:
        """Classes found on disk: 1000 for ImageNet-1k (also for archives not yet extracted)."""
        unpacked = self._classes is not None or self.split_classes("val") or self.split_classes("train")
        if not unpacked and (self.has_archives("val") or self.has_archives("train")):
            return 1000
        return len(self.classes)

    def missing_error(self, what: str) -> DataError:
        return DataError(
            f"{TITLE} not found under {self.root} ({what}). Expected layout: {LAYOUT}. Source: {SOURCE}. Set "
            f"--data.root / ${DATA_ROOT_ENV} to where it is."
        )

    # ---------------------------------------------------------------- data
    def ood_transform(self) -> T.Compose:
        return imagenet_eval_transform(self.normalization, self.image_size, self.resize_size, self.interpolation)

    def extract(self, split: str) -> None:
        """Let torchvision's ``ImageNet`` unpack the archives of ``split`` into ``<root>/<split>/`` (once)."""
        if self.split_classes(split) or not self.has_archives(split):
            return
        import torchvision.datasets

        rank_zero_info(f"{TITLE}: extracting {self.root / ARCHIVES[split]} into {self.root / split} (once).")
        try:
            torchvision.datasets.ImageNet(str(self.root), split=split)
        except RuntimeError as err:  # torchvision: "The archive ... is not present ... or is corrupted"
            raise DataError(f"{TITLE}: cannot extract the {split} archives under {self.root} ({err}).") from err

    def split(self, split: str, transform: Callable) -> CheckedImageFolder:
        """One split as an image folder, extracted from torchvision's archives first when needed."""
        self.extract(split)
        if not self.split_classes(split):
            found = "missing" if not (self.root / split).is_dir() else "has no class folders with images"
            raise self.missing_error(f"{self.root / split} is {found}")
        try:
            dataset = CheckedImageFolder(str(self.root / split), transform, self.bad_images, f"{TITLE} {split}")
        except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
            raise DataError(f"{TITLE}: {self.root / split}: {err}. Expected layout: {LAYOUT}.") from err
        if dataset.classes != self.classes:
            raise self.mismatch_error(split, dataset.classes)
        return dataset

    def mismatch_error(self, split: str, classes: list[str]) -> DataError:
        """The class folders ``classes`` of ``split`` are not the ID classes (those of the other split)."""
        other = "val" if split == "train" else "train"
        only_here = sorted(set(classes) - set(self.classes)) or ["-"]
        only_there = sorted(set(self.classes) - set(classes)) or ["-"]
        return DataError(
            f"{TITLE}: the class folders of {self.root / split} ({len(classes)}) differ from those of "
            f"{self.root / other} ({len(self.classes)}); first only in {split}/: {only_here[0]}, first only in "
            f"{other}/: {only_there[0]}. Both splits need the same classes (wnids) for the labels to agree."
        )

    def check_classes(self) -> None:
        """Both splits' class folders alike, before the run writes anything (``setup`` checks again on every rank)."""
        for split in ("train", "val"):
            classes = self.split_classes(split)
            if classes and classes != self.classes:
                raise self.mismatch_error(split, classes)

    def prepare_data(self) -> None:
        self.prepare_ood_sets()
        for split in ("val", "train"):  # one process extracts; setup then only reads folders
            self.extract(split)
        self.check_classes()

    def setup(self, stage: str | None = None) -> None:
        test_tf = self.ood_transform()
        if stage in (None, "fit") and self.train_set is None:
            train_tf = imagenet_train_transform(self.normalization, self.image_size, self.interpolation)
            self.train_set = self.split("train", train_tf)
        if stage in (None, "test", "validate", "predict") and not self.test_sets:
            id_test = self.count_skipped(self.id_name, self.split("val", test_tf))
            self.test_sets = {self.id_name: id_test, **self.build_ood_sets(dataset_files(id_test))}
        if stage in (None, "fit", "statistics") and self.statistics_set is None:
            statistics = self.split("train", test_tf)  # train_per_class: OODDataModule.statistics_images
            self.statistics_set = self.count_skipped(f"{self.id_name} (training)", statistics)
