"""Image transforms and the input normalisation, which belongs to the weights.

A network is trained with one per-channel normalisation ``(x - mean) / std`` of pixels in [0, 1]; evaluating it with
another silently changes every feature. The model resolves its normalisation (an explicit ``model.normalization``,
else the one its published weights were trained with, else the one stored in its checkpoint, else the dataset's
default) and every loader of the DataModule (training, statistics, ID test, every OOD set, validation) normalises with
it through one shared :class:`InputNormalization`, read when an image is transformed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from lightning_ood.normalization import NORMALIZATION, Normalization

__all__ = ["NORMALIZATION", "InputNormalization", "Normalization", "Normalize", "eval_transform", "to_rgb"]


class InputNormalization:
    """The normalisation currently in force for one DataModule; every transform of that DataModule reads it when it
    runs, so the model can set it after the datasets were built (a checkpoint is loaded after ``setup``)."""

    def __init__(self, value: Normalization) -> None:
        self.value = value


class Normalize:
    """``torchvision``'s Normalize with the values of a :class:`Normalization` or of a shared
    :class:`InputNormalization`, read at call time."""

    def __init__(self, normalization: Normalization | InputNormalization) -> None:
        self.normalization = normalization

    @property
    def current(self) -> Normalization:
        n = self.normalization
        return n.value if isinstance(n, InputNormalization) else n

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return TF.normalize(tensor, self.current.mean, self.current.std)

    def __repr__(self) -> str:  # part of the feature-cache key: it must show the values
        return f"Normalize(mean={list(self.current.mean)}, std={list(self.current.std)})"


def to_rgb(image):
    """Convert a PIL image of any mode (greyscale, palette, RGBA) to 3-channel RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def cifar_train_transform(normalization: Normalization | InputNormalization, size: int = 32) -> T.Compose:
    """Random crop with 4-pixel zero padding and horizontal flip, as in the paper's training recipe."""
    return T.Compose(
        [T.Lambda(to_rgb), T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
         Normalize(normalization)]
    )  # fmt: skip


def eval_transform(normalization: Normalization | InputNormalization, size: int | None = None) -> T.Compose:
    """RGB conversion, an optional resize to ``size x size`` (OOD images of other sizes), tensor, normalisation."""
    steps = [T.Lambda(to_rgb)]
    if size is not None:
        steps.append(T.Resize((size, size), antialias=True))
    steps += [T.ToTensor(), Normalize(normalization)]
    return T.Compose(steps)


def as_normalization(value: Sequence[Sequence[float]] | Normalization) -> Normalization:
    """A :class:`Normalization` from itself or from a ``(mean, std)`` pair."""
    return value if isinstance(value, Normalization) else Normalization(tuple(value[0]), tuple(value[1]))
