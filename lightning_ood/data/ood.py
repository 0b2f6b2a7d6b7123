"""OOD test sets by name. Each is resized to the ID resolution and normalised like the ID data.

In configs an entry is a name (``svhn``) or a mapping ``{name: tin, image_list: ..., root: ..., label: ...}``:
``root`` overrides the default folder ``<ood_root>/<folder>``, ``label`` the name shown in tables, and the remaining
keys are the set's options (``image_list`` for file-based sets; ``size``, ``seed`` for generated ones).

Registered sets (default folder under ``ood_root``; layout as torchvision or the distributor provides it):

- ``svhn`` (``svhn/``): ``test_32x32.mat`` (torchvision ``SVHN(split="test")``, downloadable).
- ``textures`` (``dtd/``): all 5,640 DTD images, ``dtd/dtd/images/<class>/*.jpg`` (torchvision ``DTD``,
  downloadable), ``dtd/images/`` or ``images/``.
- ``lsun_crop`` (``LSUN/``), ``lsun_resize`` (``LSUN_resize/``), ``isun`` (``iSUN/``): images anywhere below, as in
  the ODIN repository's archives.
- ``places365`` (``places365/``): ``val_256/*.jpg`` (torchvision ``Places365(split="val", small=True)``,
  downloadable) or any image folder; ``image_list`` for a fixed subset.
- ``tin`` (``tiny-imagenet-200/``): ``val/images/*.JPEG``; ``image_list`` for OpenOOD's lists.
- ``inaturalist`` (``iNaturalist/``), ``sun`` (``SUN/``), ``places`` (``Places/``): the ImageNet benchmark's OOD sets
  curated by MOS (Huang & Li, CVPR 2021), 10,000 images each of concepts absent from ImageNet-1k, ``images/*.jpg`` as
  in the MOS archives (not downloadable here); with ``textures`` they are the paper's Table II sets.
- ``mnist`` (``mnist/``), ``fashion_mnist`` (``fashion-mnist/``): ``t10k-images-idx3-ubyte[.gz]`` in the folder,
  ``raw/`` or torchvision's ``MNIST/raw`` (downloadable).
- ``cifar10``, ``cifar100`` (the ``ood_root`` itself): torchvision's files (downloadable) or ``test/<class>/*``.
- ``gaussian_noise``, ``uniform_noise``: generated, N(0, 1) / U(-1, 1) per input value; options ``size``, ``seed``.
- ``folder``: any images below ``root``; ``image_list``: ``root`` + a list file, one relative path per line.

File-based sets take ``bad_images: error`` (default: an undecodable file stops the run, naming it) or ``skip`` (each
file is decoded once up front; failures are left out with a warning and counted under the result table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lightning_ood.data.cifar_files import CIFAR, check_cifar_folders, check_writable, cifar_split
from lightning_ood.data.sets import (
    ArrayImages,
    ImageFiles,
    NoiseImages,
    OODLabels,
    find_idx_file,
    find_images,
    read_idx_images,
    read_image_list,
)
from lightning_ood.errors import ConfigError, DataError, unknown_name


@dataclass(frozen=True)
class OODSet:
    """A registered OOD set.

    Attributes:
        build: ``build(root, transform, name, **options) -> Dataset`` (generated sets: ``build(shape, **options)``).
        folder: default folder under ``ood_root`` ("" = ``ood_root`` itself; ``None`` = a root must be given).
        layout: the expected on-disk layout, for error messages.
        source: where the data comes from, for error messages.
        title: display name (the paper's column name where the paper uses the set).
        download: ``download(root)`` fetching the data with torchvision, when it can.
        present: ``present(root)``: whether the data is there (decides whether ``prepare_data`` downloads).
        generated: built from the input shape and options alone, no files.
        check: ``check(root)`` raising a :class:`DataError` for data laid out wrongly, cheap enough for
            ``prepare_data`` (before a run writes anything).
    """

    build: Callable[..., Dataset]
    folder: str | None
    layout: str
    source: str
    title: str
    download: Callable[[Path], None] | None = None
    present: Callable[[Path], bool] | None = None
    generated: bool = False
    check: Callable[[Path], None] | None = None


def missing_error(name: str, root: Path, spec: OODSet, detail: str = "") -> DataError:
    how = "it is downloaded when data.download is true and the network allows" if spec.download else "download it"
    return DataError(
        f"OOD set '{name}' not found at {root}{detail}. Expected layout: {spec.layout}. Source: {spec.source} ({how}). "
        f"Set its folder with {{name: {name}, root: <path>}} or data.ood_root, or drop it from data.ood "
        f"(data.skip_missing_ood: true skips missing sets with a warning)."
    )


# ------------------------------------------------------------------------------------------------ builders
def _images_below(
    root: Path, transform, name: str, image_list: str | None = None, bad_images: str = "error"
) -> Dataset:
    if image_list is not None:
        return ImageFiles(read_image_list(Path(image_list).expanduser(), root, name), transform, name, bad_images)
    if not root.is_dir():
        raise missing_error(name, root, OOD_SETS.get(name, OOD_SETS["folder"]))
    paths = find_images(root)
    if not paths:
        raise DataError(f"OOD set '{name}' is empty: no images under {root}.")
    return ImageFiles(paths, transform, name, bad_images)


def _subfolder(*candidates: str) -> Callable[..., Dataset]:
    """Images below the first existing candidate sub-folder of the root (or below the root itself)."""

    def build(root: Path, transform, name: str, image_list: str | None = None, bad_images: str = "error") -> Dataset:
        if image_list is None:
            root = next((root / c for c in candidates if (root / c).is_dir()), root)
        return _images_below(root, transform, name, image_list, bad_images)

    return build


def _has_subfolder(*candidates: str) -> Callable[[Path], bool]:
    return lambda root: any((root / c).is_dir() for c in candidates)


def _svhn(root: Path, transform, name: str) -> Dataset:
    path = root / "test_32x32.mat"
    if not path.is_file():
        raise missing_error(name, root, OOD_SETS["svhn"])
    from scipy.io import loadmat

    try:
        images = loadmat(str(path))["X"]  # (32, 32, 3, N), as distributed
    except (ValueError, KeyError, OSError) as err:
        raise DataError(f"OOD set '{name}': {path} is not a readable SVHN .mat file ({err}).") from err
    return ArrayImages(np.ascontiguousarray(images.transpose(3, 0, 1, 2)), transform)


def _svhn_download(root: Path) -> None:
    from torchvision.datasets import SVHN

    SVHN(str(root), split="test", download=True)


def _dtd_download(root: Path) -> None:
    from torchvision.datasets import DTD

    DTD(str(root), download=True)


def _places_download(root: Path) -> None:
    from torchvision.datasets import Places365

    Places365(str(root), split="val", small=True, download=True)


def _idx(stem: str, key: str) -> Callable[..., Dataset]:
    def build(root: Path, transform, name: str) -> Dataset:
        path = find_idx_file(root, stem)
        if path is None:
            raise missing_error(name, root, OOD_SETS[key])
        return ArrayImages(read_idx_images(path), transform)

    return build


def _idx_download(torchvision_class: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, torchvision_class)(str(root), train=False, download=True)

    return download


def _cifar(key: str) -> Callable[..., Dataset]:
    def build(root: Path, transform, name: str) -> Dataset:
        return OODLabels(cifar_split(key, root, train=False, transform=transform))

    return build


def _cifar_download(key: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        CIFAR[key].torchvision_class(str(root), train=False, download=True)

    return download


def _cifar_check(key: str) -> Callable[[Path], None]:
    def check(root: Path) -> None:
        check_cifar_folders(key, root)

    return check


def _cifar_present(key: str) -> Callable[[Path], bool]:
    def present(root: Path) -> bool:
        return (root / CIFAR[key].folder).is_dir() or (root / "test").is_dir()

    return present


def _noise(kind: str) -> Callable[..., Dataset]:
    def build(shape: tuple[int, int, int], size: int = 10_000, seed: int = 0, **kw) -> Dataset:
        return NoiseImages(size=size, shape=shape, kind=kind, seed=seed, **kw)

    return build


def _tin(root: Path, transform, name: str, image_list: str | None = None, bad_images: str = "error") -> Dataset:
    if image_list is None and not (root / "val" / "images").is_dir():
        raise missing_error(name, root, OOD_SETS["tin"])
    return _images_below(root if image_list else root / "val" / "images", transform, name, image_list, bad_images)


def _image_list(root: Path, transform, name: str, image_list: str | None = None, bad_images: str = "error") -> Dataset:
    if image_list is None:
        raise ConfigError(f"OOD set '{name}' needs an image_list: {{name: image_list, root: ..., image_list: ...}}.")
    return _images_below(root, transform, name, image_list, bad_images)


# The ImageNet benchmark's curated OOD sets (MOS repository deeplearning-wisc/large_scale_ood, README).
MOS = "MOS, Huang & Li, CVPR 2021"
MOS_SOURCE = "http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset"

OOD_SETS: dict[str, OODSet] = {
    "svhn": OODSet(
        _svhn, "svhn", "<root>/test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/ (torchvision SVHN)", "SVHN",
        download=_svhn_download, present=lambda root: (root / "test_32x32.mat").is_file(),
    ),
    "textures": OODSet(
        _subfolder("dtd/dtd/images", "dtd/images", "images"), "dtd",
        "<root>/dtd/dtd/images/<class>/*.jpg (torchvision DTD), <root>/dtd/images/ or <root>/images/ (5,640 images)",
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (torchvision DTD)", "Textures",
        download=_dtd_download, present=_has_subfolder("dtd/dtd/images", "dtd/images", "images"),
    ),
    "lsun_crop": OODSet(
        _subfolder(), "LSUN", "<root>/**/*.jpg (ODIN's LSUN.tar.gz: LSUN/test/*.jpg, 10,000 images)",
        "https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz (from the ODIN repository)", "LSUN-C",
    ),
    "lsun_resize": OODSet(
        _subfolder(), "LSUN_resize", "<root>/**/*.jpg (ODIN's LSUN_resize.tar.gz, 10,000 images)",
        "https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz (from the ODIN repository)", "LSUN-R",
    ),
    "isun": OODSet(
        _subfolder(), "iSUN", "<root>/**/*.jpeg (ODIN's iSUN.tar.gz: iSUN/iSUN_patches/*.jpeg, 8,925 images)",
        "https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz (from the ODIN repository)", "iSUN",
    ),
    "places365": OODSet(
        _subfolder("val_256"), "places365",
        "<root>/val_256/*.jpg (torchvision Places365 split='val', small=True) or any image folder; image_list for a "
        "fixed subset",
        "http://places2.csail.mit.edu/download.html (torchvision Places365)", "Places365",
        download=_places_download, present=lambda root: root.is_dir() and any(root.iterdir()),
    ),
    "tin": OODSet(
        _tin, "tiny-imagenet-200",
        "<root>/val/images/val_N.JPEG (optionally filtered by image_list, e.g. OpenOOD's cifar10_test_tin.txt)",
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "TIN",
    ),
    "inaturalist": OODSet(
        _subfolder("images"), "iNaturalist",
        "<root>/images/*.jpg (MOS's iNaturalist subset: 10,000 images of 110 plant concepts not in ImageNet-1k)",
        f"{MOS_SOURCE}/iNaturalist.tar.gz ({MOS})", "iNaturalist",
    ),
    "sun": OODSet(
        _subfolder("images"), "SUN",
        "<root>/images/*.jpg (MOS's SUN subset: 10,000 images of 50 scene concepts not in ImageNet-1k)",
        f"{MOS_SOURCE}/SUN.tar.gz ({MOS})", "SUN",
    ),
    "places": OODSet(
        _subfolder("images"), "Places",
        "<root>/images/*.jpg (MOS's Places subset: 10,000 images of 50 scene concepts not in ImageNet-1k)",
        f"{MOS_SOURCE}/Places.tar.gz ({MOS})", "Places",
    ),
    "mnist": OODSet(
        _idx("t10k-images-idx3-ubyte", "mnist"), "mnist",
        "<root>/t10k-images-idx3-ubyte[.gz] (also <root>/raw/ or torchvision's <root>/MNIST/raw/)",
        "http://yann.lecun.com/exdb/mnist/ (torchvision MNIST)", "MNIST",
        download=_idx_download("MNIST"), present=lambda root: find_idx_file(root, "t10k-images-idx3-ubyte") is not None,
    ),
    "fashion_mnist": OODSet(
        _idx("t10k-images-idx3-ubyte", "fashion_mnist"), "fashion-mnist",
        "<root>/t10k-images-idx3-ubyte[.gz] (also <root>/raw/ or torchvision's <root>/FashionMNIST/raw/)",
        "https://github.com/zalandoresearch/fashion-mnist (torchvision FashionMNIST)", "Fashion-MNIST",
        download=_idx_download("FashionMNIST"),
        present=lambda root: find_idx_file(root, "t10k-images-idx3-ubyte") is not None,
    ),
    "cifar10": OODSet(
        _cifar("cifar10"), "", "<root>/cifar-10-batches-py (torchvision) or <root>/test/<class>/*",
        "https://www.cs.toronto.edu/~kriz/cifar.html (torchvision CIFAR10)", "CIFAR-10",
        download=_cifar_download("cifar10"), present=_cifar_present("cifar10"), check=_cifar_check("cifar10"),
    ),
    "cifar100": OODSet(
        _cifar("cifar100"), "", "<root>/cifar-100-python (torchvision) or <root>/test/<class>/*",
        "https://www.cs.toronto.edu/~kriz/cifar.html (torchvision CIFAR100)", "CIFAR-100",
        download=_cifar_download("cifar100"), present=_cifar_present("cifar100"), check=_cifar_check("cifar100"),
    ),
    "gaussian_noise": OODSet(
        _noise("gaussian"), None, "generated", "generated, N(0, 1) per input value", "Gaussian", generated=True
    ),
    "uniform_noise": OODSet(
        _noise("uniform"), None, "generated", "generated, U(-1, 1) per input value", "Uniform", generated=True
    ),
    "folder": OODSet(_subfolder(), None, "<root>/**/<image>", "your own images", "Folder"),
    "image_list": OODSet(_image_list, None, "<root>/<path> per line of image_list", "your own list", "Image list"),
}  # fmt: skip


def ood_entry(entry: str | dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Normalise a config entry into ``(display name, registered name, options)``.

    ``"mnist"`` -> ``("mnist", "mnist", {})``; ``{"name": "tin", "label": "tin_openood", "image_list": ...}`` ->
    ``("tin_openood", "tin", {"image_list": ...})``. The ``group`` key (``near``, ``far``: the table averages each
    group) is not an option of the set (see :func:`ood_group`).
    """
    if isinstance(entry, str):
        return entry, entry, {}
    options = dict(entry)
    if "name" not in options:
        raise ConfigError(f"An OOD set entry needs a 'name' key, got {entry!r}.")
    name = options.pop("name")
    label = options.pop("label", name)
    options.pop("group", None)
    return label, name, options


def ood_group(entry: str | dict[str, Any]) -> str | None:
    """The group of an OOD set entry (``near``, ``far``, or any name), averaged together in the tables."""
    return entry.get("group") if isinstance(entry, dict) else None


def ood_spec(name: str) -> OODSet:
    if name not in OOD_SETS:
        raise unknown_name("OOD set", name, OOD_SETS)
    return OOD_SETS[name]


def ood_path(name: str, ood_root: Path, root: str | None = None) -> Path:
    """Where the set ``name`` is read from: its explicit ``root`` or ``<ood_root>/<default folder>``."""
    spec = ood_spec(name)
    if root is not None:
        return Path(root).expanduser()
    if spec.folder is None:
        raise ConfigError(f"The '{name}' OOD set needs a root: {{name: {name}, root: <path>}}.")
    return ood_root / spec.folder if spec.folder else ood_root


def download_ood_set(name: str, ood_root: Path, root: str | None = None) -> bool:
    """Download the set with torchvision when it is missing and torchvision can; returns whether it downloaded."""
    spec = ood_spec(name)
    if spec.generated or spec.download is None:
        return False
    path = ood_path(name, ood_root, root)
    if spec.present is not None and spec.present(path):
        return False
    check_writable(path, f"OOD set '{name}'")
    try:
        spec.download(path)
    except (OSError, RuntimeError) as err:  # URLError, timeouts, integrity check failures
        raise missing_error(name, path, spec, f" and downloading it failed ({err})") from err
    return True


def check_ood_set(name: str, ood_root: Path, root: str | None = None) -> None:
    """The set's cheap layout check (``check``), where it has one: raises a :class:`DataError` naming what is off."""
    spec = ood_spec(name)
    if spec.check is not None:
        spec.check(ood_path(name, ood_root, root))


def build_ood_set(
    name: str,
    transform: Callable,
    shape: tuple[int, int, int],
    ood_root: Path,
    root: str | None = None,
    **options: Any,
) -> Dataset:
    """Build the registered OOD set ``name`` (images resized/normalised by ``transform``; noise of ``shape``)."""
    spec = ood_spec(name)
    try:
        if spec.generated:
            return spec.build(shape=shape, **options)
        return spec.build(ood_path(name, ood_root, root), transform, name=name, **options)
    except TypeError as err:
        raise ConfigError(f"OOD set '{name}': invalid options {sorted(options)} ({err}).") from err
