"""OOD test sets by name. Each is resized to the ID resolution and normalised like the ID data.

``build_ood_set(name, root, transform, shape, **options)``; in configs an entry is a name (``mnist``) or a mapping
(``{name: tin, image_list: .../cifar10_test_tin.txt}``) whose other keys are the options below. ``root`` defaults to
``<ood_root>/<default folder>``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lightning_ood.data.sets import ArrayImages, ImageFiles, NoiseImages, find_idx_file, find_images, read_idx_images
from lightning_ood.data.sets import read_image_list as _read_list
from lightning_ood.errors import ConfigError, DataError, unknown_name


@dataclass(frozen=True)
class OODSet:
    """A registered OOD set: how to build it and what to tell a user who does not have it."""

    build: Callable[..., Dataset]
    folder: str | None  # default folder under ood_root; None for generated sets
    layout: str  # the expected on-disk layout, for error messages
    source: str  # where the data comes from
    title: str  # display name (the paper's column name where the paper uses the set)
    generated: bool = False  # built from ``shape`` and options alone, no files


def _missing(name: str, root: Path, spec: OODSet) -> DataError:
    return DataError(
        f"OOD set '{name}' not found at {root}. Expected layout: {spec.layout}. Source: {spec.source}. Set its root "
        f"with {{name: {name}, root: <path>}} or data.ood_root."
    )


def _folder(root: Path, transform, image_list: str | None = None, name: str = "folder") -> Dataset:
    if image_list is not None:
        return ImageFiles(_read_list(Path(image_list).expanduser(), root, name), transform, name)
    if not root.is_dir():
        raise DataError(f"OOD set '{name}': folder {root} does not exist.")
    paths = find_images(root)
    if not paths:
        raise DataError(f"OOD set '{name}': no images under {root}.")
    return ImageFiles(paths, transform, name)


def _tin(root: Path, transform, image_list: str | None = None, name: str = "tin") -> Dataset:
    if image_list is None and not (root / "val" / "images").is_dir():
        raise _missing(name, root, OOD_SETS["tin"])
    return _folder(root if image_list else root / "val" / "images", transform, image_list, name)


def _idx(stem: str, key: str) -> Callable[..., Dataset]:
    def build(root: Path, transform, name: str = key) -> Dataset:
        path = find_idx_file(root, stem)
        if path is None:
            raise _missing(name, root, OOD_SETS[key])
        return ArrayImages(read_idx_images(path), transform)

    return build


def _noise(kind: str) -> Callable[..., Dataset]:
    def build(shape: tuple[int, int, int], size: int = 10_000, seed: int = 0, **kw) -> Dataset:
        return NoiseImages(size=size, shape=shape, kind=kind, seed=seed, **kw)

    return build


OOD_SETS: dict[str, OODSet] = {
    "tin": OODSet(
        _tin,
        "tiny-imagenet-200",
        "<root>/val/images/val_N.JPEG (optionally filtered by image_list, e.g. OpenOOD's cifar10_test_tin.txt)",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "TIN",
    ),
    "mnist": OODSet(
        _idx("t10k-images-idx3-ubyte", "mnist"),
        "mnist",
        "<root>/t10k-images-idx3-ubyte[.gz] (also <root>/raw/ or torchvision's <root>/MNIST/raw/)",
        "http://yann.lecun.com/exdb/mnist/ (torchvision.datasets.MNIST)",
        "MNIST",
    ),
    "fashion_mnist": OODSet(
        _idx("t10k-images-idx3-ubyte", "fashion_mnist"),
        "fashion-mnist",
        "<root>/t10k-images-idx3-ubyte[.gz] (also <root>/raw/ or torchvision's <root>/FashionMNIST/raw/)",
        "https://github.com/zalandoresearch/fashion-mnist (torchvision.datasets.FashionMNIST)",
        "Fashion-MNIST",
    ),
    "gaussian_noise": OODSet(
        _noise("gaussian"), None, "generated", "generated, N(0, 1) per input value", "Gaussian", generated=True
    ),
    "uniform_noise": OODSet(
        _noise("uniform"), None, "generated", "generated, U(-1, 1) per input value", "Uniform", generated=True
    ),
    "folder": OODSet(_folder, None, "<root>/**/<image>", "your own images", "Folder"),
}


def ood_entry(entry: str | dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Normalise a config entry into ``(display name, registered name, options)``.

    ``"mnist"`` -> ``("mnist", "mnist", {})``; ``{"name": "tin", "label": "tin_openood", "image_list": ...}`` ->
    ``("tin_openood", "tin", {"image_list": ...})``.
    """
    if isinstance(entry, str):
        return entry, entry, {}
    options = dict(entry)
    if "name" not in options:
        raise ConfigError(f"An OOD set entry needs a 'name' key, got {entry!r}.")
    name = options.pop("name")
    label = options.pop("label", name)
    return label, name, options


def build_ood_set(
    name: str,
    transform: Callable,
    shape: tuple[int, int, int],
    ood_root: Path,
    root: str | None = None,
    **options: Any,
) -> Dataset:
    """Build the registered OOD set ``name`` (images resized/normalised by ``transform``; noise of ``shape``)."""
    if name not in OOD_SETS:
        raise unknown_name("OOD set", name, OOD_SETS)
    spec = OOD_SETS[name]
    try:
        if spec.generated:
            return spec.build(shape=shape, **options)
        if root is not None:
            path = Path(root).expanduser()
        elif spec.folder is not None:
            path = ood_root / spec.folder
        else:
            raise ConfigError(f"The '{name}' OOD set needs a root: {{name: {name}, root: <path>}}.")
        return spec.build(path, transform, name=name, **options)
    except TypeError as err:
        raise ConfigError(f"OOD set '{name}': invalid options {sorted(options)} ({err}).") from err
