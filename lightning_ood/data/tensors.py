"""CIFAR as tensors: images decoded once into a uint8 tensor (N, 3, H, W), augmented per image on whole batches with
tensor ops on the device the model trains on.

- Decoding once: torchvision's arrays as they are, or an image folder decoded once (optionally cached on disk,
  keyed by the folder's files, sizes and modification times, with a checksum: see
  :class:`~lightning_ood.features.FeatureCache`). Training, the statistics pass and the ID test share the tensors.
- Training batches leave the loader as uint8 with their dataset indices and epoch (:class:`RawBatch`); the
  DataModule's ``on_after_batch_transfer`` augments them on the device: a random crop with 4-pixel zero padding and a
  horizontal flip per image, the same distribution as torchvision's ``RandomCrop(32, padding=4)`` and
  ``RandomHorizontalFlip()``, then normalisation. Each image's offsets and flip come from a hash of (seed, epoch,
  dataset index), so the order and every crop and flip depend on nothing else, whatever the device or the number of
  processes: on CPU a run killed and resumed is bit-identical to an uninterrupted one; on a GPU the batches are
  identical too, while cuDNN's and bf16's arithmetic is reproducible only with ``trainer.deterministic: true``.
- Evaluation items are normalised float images (the normalisation in force when they are read).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ood.data.images import decode_image
from lightning_ood.data.transforms import InputNormalization, Normalization
from lightning_ood.errors import DataError
from lightning_ood.precision import device_constant

PADDING = 4  # the paper's random crop: 32 x 32 out of the image padded by 4 zero pixels on each side
DECODER = "rgb8-v1"  # how files become pixels (lightning_ood.data.images.decode_image); part of the cache key


class RawBatch(NamedTuple):
    """A training batch before augmentation: uint8 images (B, 3, H, W), labels, dataset indices and epochs."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    epochs: Tensor


def mix(seed: int, epochs: Tensor, indices: Tensor) -> Tensor:  # -> (B,) int64 in [0, 2^32)
    """A 32-bit hash of (seed, epoch, index) per image: integer ops only, the same on every device."""
    mask = 0xFFFFFFFF
    x = (indices.long() * 2654435761 + epochs.long() * 40503 + (seed & mask) * 2246822519) & mask
    for _ in range(3):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    return x ^ (x >> 16)


def crop_and_flip(images: Tensor, seed: int, epochs: Tensor, indices: Tensor, padding: int = PADDING) -> Tensor:
    """Per image: a random ``H x W`` crop of the image zero-padded by ``padding`` (offsets uniform in
    ``0 .. 2 * padding`` on each axis) and a horizontal flip with probability 1/2, drawn from the image's (seed, epoch,
    index) hash. ``images``: (B, C, H, W) of any dtype, on any device."""
    b, c, h, w = images.shape
    draw = mix(seed, epochs.to(images.device), indices.to(images.device))
    span = 2 * padding + 1
    dx, dy, flip = draw % span, (draw // span) % span, (draw // (span * span)) % 2 == 1
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros
    rows = dy[:, None] + torch.arange(h, device=images.device)[None, :]  # (B, H)
    columns = torch.arange(w, device=images.device)[None, :]
    columns = dx[:, None] + torch.where(flip[:, None], w - 1 - columns, columns)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], columns[:, None, None, :]]


def normalize_uint8(images: Tensor, normalization: Normalization) -> Tensor:  # uint8 (B, C, H, W) -> float32
    mean = device_constant(normalization.mean, torch.float32, images.device).view(1, -1, 1, 1)  # made once: no copy
    std = device_constant(normalization.std, torch.float32, images.device).view(1, -1, 1, 1)  # at every batch
    return (images.float() / 255.0 - mean) / std


class TrainingImages(Dataset):
    """The training images for the tensor pipeline: keys ``(index, epoch)`` (from
    :class:`~lightning_ood.data.reproducible.EpochShuffle`); whole batches come out of ``__getitems__`` as one
    :class:`RawBatch` (the loader's ``collate_fn`` passes it on as is). ``keep`` restricts the images
    (``val_split``)."""

    def __init__(self, images: Tensor, targets: Tensor, keep: Sequence[int] | None = None) -> None:
        self.images, self.targets_tensor = images, targets
        self.keep = torch.as_tensor(list(keep), dtype=torch.long) if keep is not None else None

    def __len__(self) -> int:
        return len(self.keep) if self.keep is not None else len(self.images)

    def __getitems__(self, keys: list[tuple[int, int]]) -> RawBatch:
        positions = torch.tensor([k[0] for k in keys], dtype=torch.long)
        indices = self.keep[positions] if self.keep is not None else positions
        epochs = torch.tensor([k[1] for k in keys], dtype=torch.long)
        return RawBatch(self.images[indices], self.targets_tensor[indices], indices, epochs)

    def __getitem__(self, key: tuple[int, int]) -> RawBatch:
        return self.__getitems__([key])

    def subset(self, keep: Sequence[int]) -> TrainingImages:
        return TrainingImages(self.images, self.targets_tensor, keep)


def pass_batch(batch):
    """The loader's ``collate_fn`` for :class:`TrainingImages`: the batch is already one."""
    return batch


class DecodedImages(Dataset):
    """Decoded uint8 images with labels; items are ``(normalised float image, label)`` with the normalisation in
    force when they are read (evaluation: ID test, statistics, validation)."""

    def __init__(self, images: Tensor, targets: Tensor, normalization: InputNormalization | Normalization) -> None:
        self.images, self.targets_tensor = images, targets
        self.normalization = normalization
        self.targets = targets.tolist()  # as torchvision's datasets: for first_per_class without decoding

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = self.normalization
        value = n.value if isinstance(n, InputNormalization) else n
        return normalize_uint8(self.images[index][None], value)[0], int(self.targets_tensor[index])

    @property
    def transform(self) -> str:  # the feature cache's key reads the transform
        n = self.normalization
        value = n.value if isinstance(n, InputNormalization) else n
        return f"DecodedImages(mean={list(value.mean)}, std={list(value.std)})"


def decode_files(paths: Sequence[str], description: str, progress: bool = True) -> Tensor:
    """Every image file decoded (RGB, 8 bits) into one uint8 tensor (N, 3, H, W); all must share one size."""
    images = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=len(paths))
        for i, path in enumerate(paths):
            array = np.array(decode_image(path), dtype=np.uint8)  # (H, W, 3), a writable copy
            if images is None:
                images = torch.empty((len(paths), 3, *array.shape[:2]), dtype=torch.uint8)
            if array.shape[:2] != tuple(images.shape[2:]):
                raise DataError(
                    f"{path} is {array.shape[1]}x{array.shape[0]} but the other images are "
                    f"{images.shape[3]}x{images.shape[2]}: the tensor pipeline needs one size (use pipeline: pil)."
                )
            images[i] = torch.from_numpy(array).permute(2, 0, 1)
            bar.advance(task)
    return images if images is not None else torch.empty((0, 3, 32, 32), dtype=torch.uint8)
