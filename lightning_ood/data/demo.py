"""A real-image OOD benchmark that needs no download: everything ships inside scikit-learn and scikit-image.

- ID: handwritten digits 0-5 of scikit-learn's ``load_digits`` (8x8 greyscale, upsampled to 32x32), split
  stratified into train/test.
- OOD (held-out or foreign, all real images):
  ``digits_6_9`` the held-out digit classes (near-OOD), ``faces`` the 100 face crops of scikit-image's LFW subset,
  ``textures`` random crops of scikit-image's brick / grass / gravel textures, ``photos`` random crops of natural
  photographs (scikit-image's astronaut, coffee, cat, rocket, Hubble deep field, camera, moon, coins; scikit-learn's
  china and flower), plus any registered set such as ``gaussian_noise``.

Install the data with ``pip install 'lightning-ood[demo]'`` (scikit-learn, scikit-image).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from lightning_ood.data.base import DATA_ARGS, OODDataModule
from lightning_ood.data.reproducible import check_seed
from lightning_ood.data.sets import ArrayImages
from lightning_ood.data.transforms import Normalization, Normalize, to_rgb
from lightning_ood.errors import ConfigError, DataError, unknown_name

DEMO_OOD = ("digits_6_9", "faces", "textures", "photos")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise DataError(
            f"The demo data ships with scikit-learn and scikit-image; install them: pip install 'lightning-ood[demo]' "
            f"({err})."
        ) from err


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 images (N, 8, 8) in [0, 255] and labels (N,)."""
    _require("sklearn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255.0 / 16.0)).round().astype(np.uint8), digits.target.astype(np.int64)


def random_crops(images: list[np.ndarray], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` square crops of side ``size`` spread over ``images`` (uint8, greyscale or RGB -> RGB)."""
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        side = min(size, image.shape[0], image.shape[1])
        top = rng.integers(0, image.shape[0] - side + 1)
        left = rng.integers(0, image.shape[1] - side + 1)
        crops.append(np.asarray(Image.fromarray(image[top : top + side, left : left + side]).resize((size, size))))
    return np.stack(crops)


def demo_ood_images(name: str, digits: tuple[np.ndarray, np.ndarray], id_classes: int, seed: int) -> np.ndarray:
    """uint8 images of one demo OOD set."""
    rng = np.random.default_rng(seed)
    if name == "digits_6_9":
        images, labels = digits
        return images[labels >= id_classes]
    _require("skimage")
    from skimage import data as sk

    if name == "faces":
        return (sk.lfw_subset()[:100] * 255).round().astype(np.uint8)  # the first 100 are faces
    if name == "textures":
        return random_crops([sk.brick(), sk.grass(), sk.gravel()], 300, 64, rng)
    if name == "photos":
        from sklearn.datasets import load_sample_images

        photos = [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket(), sk.hubble_deep_field(), sk.camera(),
                  sk.moon(), sk.coins(), *load_sample_images().images]  # fmt: skip
        return random_crops(photos, 400, 96, rng)
    raise unknown_name("demo OOD set", name, DEMO_OOD)


class DemoDataModule(OODDataModule):
    """Digits 0..``id_classes - 1`` as ID; held-out digits, faces, textures and photos as OOD (see module docstring).

    Args:
        id_classes: the first ``id_classes`` digits are in-distribution, the rest are the ``digits_6_9`` OOD set.
        test_fraction: share of each ID class held out for testing.
        demo_ood: which demo OOD sets to test against.
        seed: seed of the train/test split and the random crops.
        batch_size: training batch size.
        eval_batch_size: batch size for testing and statistics.
        num_workers: loader workers (0: the data is in memory).
        **kwargs: the other arguments of :class:`~lightning_ood.data.base.OODDataModule` (``ood`` for further
            registered sets, e.g. ``[{name: gaussian_noise, size: 500}]``, ``ood_root``, ``skip_missing_ood``,
            ``train_per_class``).
    """

    image_size = 32

    def __init__(
        self,
        id_classes: int = 6,
        test_fraction: float = 0.3,
        demo_ood: list[str] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = 256,
        num_workers: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, **kwargs)
        if not 2 <= id_classes <= 9:
            raise ConfigError(f"{DATA_ARGS}id_classes must be in [2, 9], got {id_classes}.")
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"{DATA_ARGS}test_fraction must be in (0, 1), got {test_fraction}.")
        check_seed(f"{DATA_ARGS}seed", seed)
        self.demo_ood = list(DEMO_OOD if demo_ood is None else demo_ood)
        for name in self.demo_ood:
            if name not in DEMO_OOD:
                raise unknown_name("demo OOD set", name, DEMO_OOD)
        self.id_classes, self.test_fraction, self.seed = id_classes, test_fraction, seed
        self.num_classes = id_classes
        self.digits = load_digits_uint8()
        images, labels = self.digits
        train_idx, test_idx = self._split(labels)
        self.train_images, self.train_labels = images[train_idx], labels[train_idx]
        self.test_images, self.test_labels = images[test_idx], labels[test_idx]
        upsampled = np.stack(
            [np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR)) for x in self.train_images]
        )
        mean = float(upsampled.mean() / 255.0)
        std = float(upsampled.std() / 255.0)
        self.default_normalization = Normalization((mean,) * 3, (std,) * 3, "statistics of the demo's training digits")

    @property
    def id_name(self) -> str:
        return f"digits_0_{self.id_classes - 1}"

    def _split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        train, test = [], []
        for c in range(self.id_classes):
            members = rng.permutation(np.flatnonzero(labels == c))
            n_test = round(len(members) * self.test_fraction)
            test.append(members[:n_test])
            train.append(members[n_test:])
        return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))

    def _transform(self, train: bool) -> T.Compose:
        steps = [T.Lambda(to_rgb), T.Resize((32, 32), antialias=True)]
        if train:
            steps.append(T.RandomCrop(32, padding=2))  # no flips: digits are not mirror-symmetric
        return T.Compose([*steps, T.ToTensor(), Normalize(self.normalization)])

    def _labelled(self, images: np.ndarray, labels: np.ndarray, train: bool) -> Dataset:
        return LabelledArrays(images, labels, self._transform(train))

    def prepare_data(self) -> None:
        rank_zero_info(
            "Demo data: a toy, offline stand-in: scikit-learn's 8x8 handwritten digits 0-5 upsampled to 32x32 as ID, "
            "held-out digits, faces, textures, photographs and noise as OOD. Real images, but tiny: its figures show "
            "that the pipeline works and say nothing about the paper's CIFAR or ImageNet results."
        )
        self.prepare_ood_sets()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._labelled(self.train_images, self.train_labels, train=True)
        if stage in (None, "fit", "statistics") and self.statistics_set is None:
            self.statistics_set = self._labelled(self.train_images, self.train_labels, train=False)
        if stage in (None, "test", "validate", "predict") and not self.test_sets:
            transform = self._transform(train=False)
            demo = {
                name: ArrayImages(demo_ood_images(name, self.digits, self.id_classes, self.seed), transform)
                for name in self.demo_ood
            }
            id_test = self._labelled(self.test_images, self.test_labels, train=False)
            self.test_sets = {self.id_name: id_test, **demo, **self.build_ood_sets()}


class LabelledArrays(Dataset):
    """uint8 images with labels, as PIL images through ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])
