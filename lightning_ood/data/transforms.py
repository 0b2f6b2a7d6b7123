"""Image transforms: CIFAR training augmentation and the evaluation transform shared by ID and OOD images."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

# Per-channel statistics of the training sets (pixel values in [0, 1]).
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def to_rgb(image):
    """Convert a PIL image of any mode (greyscale, palette, RGBA) to 3-channel RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


def cifar_train_transform(mean: Sequence[float], std: Sequence[float], size: int = 32) -> T.Compose:
    """Random crop with 4-pixel zero padding and horizontal flip, as in the paper's training recipe."""
    return T.Compose(
        [
            T.Lambda(to_rgb),
            T.RandomCrop(size, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(mean: Sequence[float], std: Sequence[float], size: int | None = None) -> T.Compose:
    """RGB conversion, an optional resize to ``size x size`` (OOD images of other sizes), tensor, normalisation."""
    steps = [T.Lambda(to_rgb)]
    if size is not None:
        steps.append(T.Resize((size, size), antialias=True))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)
