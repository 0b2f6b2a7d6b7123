"""Every OOD registry entry builds from generated stand-ins in its real on-disk layout; missing data fails clearly."""

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ood.data import CIFARDataModule
from lightning_ood.data.cifar_files import CIFAR100_CLASSES
from lightning_ood.data.ood import OOD_SETS, build_ood_set, download_ood_set
from lightning_ood.data.transforms import NORMALIZATION, eval_transform
from lightning_ood.errors import DataError
from tests.conftest import make_cifar_folder

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
