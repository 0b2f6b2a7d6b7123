"""The OOD sets (lightning_ood/data/ood.py, sets.py): every registry entry builds from generated stand-ins in its
real on-disk layout; entry forms, TIN, IDX, noise; missing data fails clearly."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ood.data import CIFARDataModule
from lightning_ood.data.cifar_files import CIFAR100_CLASSES
from lightning_ood.data.ood import OOD_SETS, build_ood_set, download_ood_set, ood_entry
from lightning_ood.data.sets import NoiseImages
from lightning_ood.data.transforms import NORMALIZATION, eval_transform
from lightning_ood.errors import ConfigError, DataError
from tests.conftest import make_cifar_folder, shared_data

MEAN, STD = NORMALIZATION["cifar10"].mean, NORMALIZATION["cifar10"].std
TRANSFORM = eval_transform(NORMALIZATION["cifar10"], 32)
SHAPE = (3, 32, 32)


def images(folder, count, size=(36, 36), suffix=".jpg", mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, (i * 20 % 256, 50, 90) if mode == "RGB" else 100).save(folder / f"img_{i:03d}{suffix}")


def make_svhn(root, count=6):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, count)).astype(np.uint8)  # SVHN's HWCN layout
    savemat(root / "test_32x32.mat", {"X": x, "y": np.arange(1, count + 1).reshape(-1, 1) % 10 + 1})


LAYOUTS = {
    "svhn": (lambda r: make_svhn(r / "svhn"), 6),
    "textures": (
        lambda r: [images(r / "dtd/dtd/images" / c, 3) for c in ("banded", "zigzagged")],
        6,
    ),  # torchvision DTD
    "lsun_crop": (lambda r: images(r / "LSUN/test", 4), 4),
    "lsun_resize": (lambda r: images(r / "LSUN_resize/LSUN_resize", 5, size=(32, 32)), 5),
    "isun": (lambda r: images(r / "iSUN/iSUN_patches", 3, suffix=".jpeg"), 3),
    "places365": (lambda r: images(r / "places365/val_256", 4, size=(256, 256)), 4),
    "tin": (lambda r: images(r / "tiny-imagenet-200/val/images", 3, size=(64, 64), suffix=".JPEG", mode="L"), 3),
    "cifar100": (lambda r: make_cifar_folder(r, classes=CIFAR100_CLASSES, train=1, test=1), 100),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_entry_builds_from_its_real_layout(name, tmp_path):
    make, count = LAYOUTS[name]
    make(tmp_path)
    dataset = build_ood_set(name, TRANSFORM, SHAPE, tmp_path)
    assert len(dataset) == count
    x, label = dataset[len(dataset) - 1]
    assert x.shape == SHAPE and x.dtype == torch.float32 and label == -1


def test_textures_alternative_layouts(tmp_path):
    images(tmp_path / "a" / "dtd" / "images" / "banded", 2)
    images(tmp_path / "b" / "images" / "banded", 3)
    assert len(build_ood_set("textures", TRANSFORM, SHAPE, tmp_path, root=str(tmp_path / "a"))) == 2
    assert len(build_ood_set("textures", TRANSFORM, SHAPE, tmp_path, root=str(tmp_path / "b"))) == 3


def test_places_with_an_image_list(tmp_path):
    images(tmp_path / "places365" / "val_256", 5, size=(64, 64))
    listing = tmp_path / "places_list.txt"
    listing.write_text("val_256/img_001.jpg 0\nval_256/img_004.jpg 0\n")
    dataset = build_ood_set("places365", TRANSFORM, SHAPE, tmp_path, image_list=str(listing))
    assert [p.name for p in dataset.paths] == ["img_001.jpg", "img_004.jpg"]


def test_generic_folder_and_image_list(tmp_path):
    images(tmp_path / "mine" / "deep" / "er", 2, suffix=".png")
    assert len(build_ood_set("folder", TRANSFORM, SHAPE, tmp_path, root=str(tmp_path / "mine"))) == 2
    listing = tmp_path / "l.txt"
    listing.write_text("deep/er/img_000.png\n")
    dataset = build_ood_set("image_list", TRANSFORM, SHAPE, tmp_path, root=str(tmp_path / "mine"),
                            image_list=str(listing))  # fmt: skip
    assert len(dataset) == 1


@pytest.mark.parametrize("name", [n for n, s in OOD_SETS.items() if not s.generated and s.folder is not None])
def test_missing_data_names_the_set_path_layout_and_source(name, tmp_path):
    spec = OOD_SETS[name]
    with pytest.raises(DataError) as info:
        build_ood_set(name, TRANSFORM, SHAPE, tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message
    if name not in ("cifar10", "cifar100"):  # the CIFAR loader has its own (equally explicit) message
        assert f"OOD set '{name}' not found" in message and spec.layout in message and spec.source in message


def test_download_failure_without_network(tmp_path, monkeypatch):
    from torchvision.datasets import SVHN

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(SVHN, "download", offline)
    with pytest.raises(DataError, match=r"OOD set 'svhn' not found at .*svhn and downloading it failed .*resolution"):
        download_ood_set("svhn", tmp_path)
    assert download_ood_set("lsun_crop", tmp_path) is False  # not downloadable: left to setup's clear error
    make_svhn(tmp_path / "svhn")
    assert download_ood_set("svhn", tmp_path) is False  # present: nothing to do


def test_skip_missing_sets_with_a_warning(cifar_folder, tmp_path):
    images(tmp_path / "LSUN" / "test", 4)
    dm = CIFARDataModule(root=str(cifar_folder), ood_root=str(tmp_path), num_workers=0, download=False,
                         ood=["lsun_crop", "isun", "svhn"], skip_missing_ood=True)  # fmt: skip
    with pytest.warns(UserWarning, match="Skipping OOD set 'isun'"):
        dm.setup("test")
    assert dm.test_set_names == ["cifar10", "lsun_crop"]
    assert sorted(dm.skipped_ood) == ["isun", "svhn"]
    strict = CIFARDataModule(root=str(cifar_folder), ood_root=str(tmp_path), num_workers=0, ood=["lsun_crop", "isun"])
    with pytest.raises(DataError, match="OOD set 'isun' not found"):
        strict.setup("test")


def test_all_sets_missing_is_an_error_even_when_skipping(cifar_folder, tmp_path):
    dm = CIFARDataModule(root=str(cifar_folder), ood_root=str(tmp_path), num_workers=0, download=False,
                         ood=["isun"], skip_missing_ood=True)  # fmt: skip
    with pytest.warns(UserWarning), pytest.raises(DataError, match="None of the configured OOD sets could be loaded"):
        dm.setup("test")


def test_cifar_near_ood_for_each_other(tmp_path):
    make_cifar_folder(tmp_path / "c10")
    dm = CIFARDataModule(dataset="cifar100", root=str(tmp_path / "c100"), num_workers=0,
                         ood=[{"name": "cifar10", "root": str(tmp_path / "c10")}])  # fmt: skip
    make_cifar_folder(tmp_path / "c100", classes=CIFAR100_CLASSES, train=1, test=1)
    dm.setup("test")
    assert dm.test_set_names == ["cifar100", "cifar10"] and len(dm.test_sets["cifar10"]) == 30
    assert dm.test_sets["cifar10"][0][1] == -1


def write_idx(path, images: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">IIII", 2051, len(images), *images.shape[1:])
    data = header + images.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_tin(root, count=5, grey=(1,)):
    images = root / "val" / "images"
    images.mkdir(parents=True)
    for i in range(count):
        mode, colour = ("L", 128) if i in grey else ("RGB", (10 * i, 20, 30))
        Image.new(mode, (64, 64), colour).save(images / f"val_{i}.JPEG")
    return root


def test_ood_entry_forms():
    assert ood_entry("mnist") == ("mnist", "mnist", {})
    assert ood_entry({"name": "tin", "label": "tin_near", "image_list": "x"}) == (
        "tin_near",
        "tin",
        {"image_list": "x"},
    )
    with pytest.raises(ConfigError, match="needs a 'name'"):
        ood_entry({"root": "x"})


def test_tin_folder_and_openood_list(tmp_path):
    root = make_tin(tmp_path / "tiny-imagenet-200")
    full = build_ood_set("tin", TRANSFORM, SHAPE, tmp_path)
    assert len(full) == 5
    x, label = full[1]  # a greyscale JPEG becomes 3 channels
    assert x.shape == SHAPE and label == -1
    listing = tmp_path / "list.txt"
    listing.write_text("tin/val/images/val_3.JPEG -1\ntin/val/images/val_0.JPEG -1\n")  # OpenOOD's prefix
    subset = build_ood_set("tin", TRANSFORM, SHAPE, tmp_path, root=str(root), image_list=str(listing))
    assert [p.name for p in subset.paths] == ["val_3.JPEG", "val_0.JPEG"]
    listing.write_text("tin/val/images/val_3.JPEG -1\ntin/val/images/val_99.JPEG -1\n")
    with pytest.raises(DataError, match=r"1 of 2 images listed in .*list.txt are missing .*val_99.JPEG"):
        build_ood_set("tin", TRANSFORM, SHAPE, tmp_path, root=str(root), image_list=str(listing))


def test_tin_missing(tmp_path):
    with pytest.raises(DataError, match=r"OOD set 'tin' not found at .*tiny-imagenet-200. Expected layout: <root>/val"):
        build_ood_set("tin", TRANSFORM, SHAPE, tmp_path)


@pytest.mark.parametrize("layout", ["flat_gz", "flat_raw", "torchvision"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_sets(tmp_path, layout, name):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28))
    folder = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}[name]
    if layout == "torchvision":
        path = tmp_path / folder / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw" / "t10k-images-idx3-ubyte"
    else:
        path = tmp_path / folder / "t10k-images-idx3-ubyte"
    write_idx(path, images, gz=layout != "flat_raw")
    dataset = build_ood_set(name, TRANSFORM, SHAPE, tmp_path)
    assert len(dataset) == 7
    x, label = dataset[3]
    assert x.shape == SHAPE and label == -1
    torch.testing.assert_close(x[0], x[1] * STD[1] / STD[0] + (MEAN[1] - MEAN[0]) / STD[0])  # grey -> same channels


def test_idx_corrupt(tmp_path):
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(DataError, match="not a valid idx3-ubyte image file"):
        build_ood_set("mnist", TRANSFORM, SHAPE, tmp_path)


def test_noise_is_deterministic_and_seeded():
    a = build_ood_set("gaussian_noise", TRANSFORM, SHAPE, None, size=5, seed=3)
    b = NoiseImages(size=5, shape=SHAPE, seed=3)
    c = NoiseImages(size=5, shape=SHAPE, seed=4)
    assert torch.equal(a[2][0], b[2][0]) and not torch.equal(a[2][0], c[2][0])
    stacked = torch.stack([NoiseImages(size=400, shape=SHAPE)[i][0] for i in range(400)])
    assert abs(stacked.mean().item()) < 0.01 and abs(stacked.std().item() - 1) < 0.01
    uniform = build_ood_set("uniform_noise", TRANSFORM, SHAPE, None, size=3)
    assert uniform[0][0].min() >= -1 and uniform[0][0].max() <= 1


def test_registry_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown OOD set 'svhm'\. Choose one of: .*mnist"):
        build_ood_set("svhm", TRANSFORM, SHAPE, tmp_path)
    with pytest.raises(ConfigError, match="invalid options"):
        build_ood_set("gaussian_noise", TRANSFORM, SHAPE, tmp_path, colour="red")
    with pytest.raises(ConfigError, match="needs a root"):
        build_ood_set("folder", TRANSFORM, SHAPE, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images under"):
        build_ood_set("folder", TRANSFORM, SHAPE, tmp_path, root=str(empty))


def test_datamodule_test_loaders_are_id_then_ood(cifar_folder, tmp_path):
    make_tin(tmp_path / "tiny-imagenet-200")
    dm = CIFARDataModule(root=str(cifar_folder), ood_root=str(tmp_path), num_workers=0, eval_batch_size=8,
                         ood=["tin", {"name": "gaussian_noise", "size": 9}, {"name": "folder", "label": "mine",
                              "root": str(tmp_path / "tiny-imagenet-200")}])  # fmt: skip
    dm.setup("test")
    assert dm.test_set_names == ["cifar10", "tin", "gaussian_noise", "mine"]
    loaders = dm.test_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [30, 5, 9, 5]
    x, y, index = next(iter(loaders[2]))
    assert x.shape == (8, 3, 32, 32) and (y == -1).all() and index.tolist() == list(range(8))  # dataset order


def test_duplicate_ood_labels(cifar_folder):
    dm = CIFARDataModule(root=str(cifar_folder), num_workers=0, ood=["gaussian_noise", "gaussian_noise"])
    with pytest.raises(ConfigError, match="used twice"):
        dm.setup("test")


def test_shared_data_sets():
    root = shared_data()
    tin = build_ood_set("tin", TRANSFORM, SHAPE, root, image_list=str(root / "openood-lists/cifar10_test_tin.txt"))
    mnist = build_ood_set("mnist", TRANSFORM, SHAPE, root)
    fashion = build_ood_set("fashion_mnist", TRANSFORM, SHAPE, root)
    assert (len(tin), len(mnist), len(fashion)) == (7793, 10000, 10000)
    assert tin[0][0].shape == mnist[0][0].shape == fashion[0][0].shape == SHAPE
