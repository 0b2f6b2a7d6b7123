"""Dataset classes for OOD images in their distributed on-disk layouts (item = ``(image, -1)``)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from lightning_ood.data.images import check_bad_images, decodable, decode_image
from lightning_ood.errors import ConfigError, DataError

OOD_LABEL = -1


def find_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursively), sorted for a deterministic order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


class ImageFiles(Dataset):
    """A list of image files, loaded as RGB PIL images and transformed; the label is always -1.

    Args:
        paths: the image files.
        transform: applied to each PIL image.
        name: the set's name, for messages.
        bad_images: ``error`` (a file that cannot be decoded stops the run with its path) or ``skip`` (every file is
            decoded once up front; the ones that fail are left out, counted in ``skipped`` and warned about).
    """

    def __init__(
        self, paths: Sequence[Path], transform: Callable | None = None, name: str = "images", bad_images: str = "error"
    ) -> None:
        check_bad_images(bad_images, name)
        if not paths:
            raise DataError(f"OOD set '{name}' is empty: no images found.")
        self.paths = list(paths)
        self.skipped: list[Path] = []
        if bad_images == "skip":
            kept, self.skipped = decodable(self.paths, f"OOD set '{name}'")
            self.paths = [self.paths[i] for i in kept]
            if not self.paths:
                raise DataError(f"OOD set '{name}' is empty: none of its {len(paths)} images could be decoded.")
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = decode_image(self.paths[index])
        return (self.transform(image) if self.transform else image), OOD_LABEL


def read_image_list(list_file: Path, root: Path, name: str) -> list[Path]:
    """Image paths from an OpenOOD-style list (``<relative path> [label]`` per line), resolved against ``root``.

    OpenOOD's lists start each path with a dataset folder name (``tin/val/images/...``); when that first component is
    not a folder under ``root``, it is dropped (so ``root`` may point at ``tiny-imagenet-200`` directly).

    Raises:
        DataError: the list is missing or empty, or names images that are not there.
        ConfigError: the list names files outside ``root`` (``..``, absolute paths, symbolic links that lead out of
            it) or names one image on several lines (it would count several times in the metrics).
    """
    if not list_file.is_file():
        raise DataError(f"{name}: image list {list_file} does not exist.")
    lines = [(number, line.split()[0]) for number, line in enumerate(list_file.read_text().splitlines(), 1)
             if line.strip()]  # fmt: skip
    if not lines:
        raise DataError(f"{name}: image list {list_file} is empty.")
    first = Path(lines[0][1])
    strip = not (root / first).exists() and (root / Path(*first.parts[1:])).exists()
    paths = [root / (Path(*Path(p).parts[1:]) if strip else Path(p)) for _, p in lines]
    check_listed_paths(list_file, root, name, lines, paths)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{name}: {len(missing)} of {len(paths)} images listed in {list_file} are missing under {root} "
            f"(first: {missing[0]}). Point the set's root at the folder the list is relative to."
        )
    return paths


def check_listed_paths(list_file: Path, root: Path, name: str, lines: list[tuple[int, str]], paths: list[Path]) -> None:
    """Refuse list entries (``lines``: line number and path as written; ``paths``: where they point) that lie outside
    ``root`` once resolved, and entries that name an image of an earlier line: the count and the first examples."""
    inside = Path(os.path.realpath(root))
    resolved = [Path(os.path.realpath(p)) for p in paths]
    outside = [(line, text, real) for (line, text), real in zip(lines, resolved, strict=True)
               if not real.is_relative_to(inside)]  # fmt: skip
    if outside:
        shown = "; ".join(f"line {line}: {text} -> {real}" for line, text, real in outside[:3])
        raise ConfigError(
            f"{name}: {len(outside)} of {len(lines)} entries of the image list {list_file} lie outside its root "
            f"{root} (first: {shown}). A list names images under its root only: no '..', no absolute paths, no "
            f"symbolic links leading out. Fix those lines, or set the set's root to the folder that holds the images."
        )
    first_line: dict[Path, int] = {}
    repeats = []
    for (line, text), real in zip(lines, resolved, strict=True):
        if real in first_line:
            repeats.append(f"line {line} repeats line {first_line[real]}: {text}")
        first_line.setdefault(real, line)
    if repeats:
        raise ConfigError(
            f"{name}: {len(repeats)} of the {len(lines)} lines of the image list {list_file} repeat an image of an "
            f"earlier line ({len(first_line)} distinct images; first: {'; '.join(repeats[:3])}). A repeated image "
            f"would count several times in the metrics: give each image once."
        )


def dataset_files(dataset: Dataset | None) -> list[Path]:
    """The image files of a file-based dataset (:class:`ImageFiles`, an image folder, through wrappers such as
    :class:`OODLabels`); empty for in-memory ones."""
    while dataset is not None and not hasattr(dataset, "paths") and not hasattr(dataset, "samples"):
        dataset = getattr(dataset, "dataset", None)
    if dataset is None:
        return []
    if hasattr(dataset, "paths"):
        return [Path(p) for p in dataset.paths]
    return [Path(p) for p, _ in dataset.samples]


def find_idx_file(root: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``root``, ``root/raw`` or torchvision's ``root/<Name>/raw``."""
    for folder in (root, root / "raw", *(p / "raw" for p in sorted(root.glob("*")) if p.is_dir())):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx_images(path: Path) -> np.ndarray:
    """Images of an idx3-ubyte file (MNIST format, optionally gzipped) as a uint8 array (N, H, W)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, count, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051 or len(data) != 16 + count * rows * cols:
        raise DataError(f"{path} is not a valid idx3-ubyte image file (magic {magic}, {len(data)} bytes).")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


class OODLabels(Dataset):
    """A labelled dataset (torchvision's SVHN, CIFAR, ...) whose labels are replaced by -1."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[index][0], OOD_LABEL


class ArrayImages(Dataset):
    """In-memory uint8 images (N, H, W) or (N, H, W, 3) turned into PIL images and transformed; label -1."""

    def __init__(self, images: np.ndarray, transform: Callable | None = None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), OOD_LABEL


class NoiseImages(Dataset):
    """Synthetic noise inputs, generated in the network's (normalised) input space, deterministic given the seed.

    ``kind="gaussian"``: each value ~ N(mean, std), the paper's validation set with the defaults N(0, 1).
    ``kind="uniform"``: each value ~ U(low, high).
    Item ``i`` is generated from ``seed + i`` so any subset or order gives the same images.
    """

    def __init__(
        self,
        size: int = 10_000,
        shape: tuple[int, int, int] = (3, 32, 32),
        kind: str = "gaussian",
        seed: int = 0,
        mean: float = 0.0,
        std: float = 1.0,
        low: float = -1.0,
        high: float = 1.0,
    ) -> None:
        if size < 1:
            raise DataError(f"{kind} noise: size must be >= 1, got {size}.")
        if kind not in ("gaussian", "uniform"):
            raise DataError(f"noise kind must be 'gaussian' or 'uniform', got {kind!r}.")
        self.size, self.shape, self.kind, self.seed = size, tuple(shape), kind, seed
        self.mean, self.std, self.low, self.high = mean, std, low, high

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed + index)
        if self.kind == "gaussian":
            x = torch.randn(self.shape, generator=generator) * self.std + self.mean
        else:
            x = torch.rand(self.shape, generator=generator) * (self.high - self.low) + self.low
        return x, OOD_LABEL
