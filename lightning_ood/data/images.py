"""Reading image files: RGB out, high bit depths converted correctly, and every failure a :class:`DataError` that
names the file.

Pillow's ``convert("RGB")`` clips 16-bit greyscale (mode ``I;16``, ``I``) to 255, so a 16-bit PNG would reach the
network almost white: such images are scaled to 8 bits first (``value / 257``). 32-bit float images are refused by
name. Images over Pillow's decompression-bomb limit and undecodable files are errors naming the file, or are left out
with a count under ``bad_images: skip``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_ood.errors import DataError

BAD_IMAGE_POLICIES = ("error", "skip")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(image: Image.Image, path: Path) -> Image.Image:
    """Greyscale of more than 8 bits scaled to 8 bits; other modes as they are."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if image.mode in SIXTEEN_BIT_MODES or values.max(initial=0) > 255:  # 16-bit data (also when opened as "I")
            values = values / 257.0
        return Image.fromarray(values.clip(0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "F":
        raise DataError(
            f"Image {path} is a 32-bit floating-point image, whose value range is unknown; convert it to an 8- or "
            f"16-bit image first."
        )
    return image


def check_bad_images(policy: str, what: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise DataError(f"{what}: bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {policy!r}.")
    return policy


def decode_image(path: str | Path) -> Image.Image:
    """Open an image as 3-channel RGB; a file Pillow cannot decode, or one over its decompression-bomb limit, is a
    :class:`DataError` naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = to_8bit(image, path)
            return image if image.mode == "RGB" else image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise DataError(
            f"Image {path} is larger than Pillow's decompression-bomb limit ({err}). Remove or shrink the file, or "
            f"skip such images of this set with bad_images: skip."
        ) from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated data, bad headers
        raise DataError(
            f"Cannot decode image {path} ({type(err).__name__}: {err}). Remove or replace the file, or skip "
            f"undecodable images of this set with bad_images: skip."
        ) from err


def decodable(paths: Sequence[Path], what: str) -> tuple[list[int], list[Path]]:
    """Decode every file once: the positions of those that decode, and the paths of those that do not (warned)."""
    kept, skipped = [], []
    for i, path in enumerate(paths):
        try:
            decode_image(path)
            kept.append(i)
        except DataError:
            skipped.append(Path(path))
    if skipped:
        warnings.warn(
            f"{what}: skipped {len(skipped)} undecodable image(s) of {len(paths)} (first: {skipped[0]}).", stacklevel=2
        )
    return kept, skipped
