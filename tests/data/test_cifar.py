"""The CIFAR data module (lightning_ood/data/cifar.py): image-folder copies, transforms, roots, clear errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lightning_ood.data import CIFARDataModule
from lightning_ood.data.base import DATA_ROOT_ENV
from lightning_ood.errors import ConfigError, DataError
from tests.conftest import CIFAR10_CLASSES, make_cifar_folder


@pytest.mark.parametrize("pipeline", ["tensor", "pil"])
def test_image_folder_copy(cifar_folder, pipeline):
    dm = CIFARDataModule(root=str(cifar_folder), batch_size=4, num_workers=0, pipeline=pipeline)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 10
    assert len(dm.train_set) == 60 and len(dm.statistics_set) == 60
    assert dm.test_set_names == ["cifar10"] and len(dm.test_sets["cifar10"]) == 30
    # labels follow the sorted folder names = torchvision's CIFAR-10 order
    assert dm.statistics_set.targets == [c for c in range(10) for _ in range(6)]
    if pipeline == "pil":
        assert dm.train_set.classes == CIFAR10_CLASSES
    batch = next(iter(dm.train_dataloader()))
    x, y = dm.on_after_batch_transfer(batch, 0)  # the tensor pipeline augments here, on the device
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_test_transform_is_deterministic_and_normalised(cifar_folder):
    dm = CIFARDataModule(root=str(cifar_folder), num_workers=0)
    dm.setup("test")
    a, label = dm.test_sets["cifar10"][0]
    b, _ = dm.test_sets["cifar10"][0]
    torch.testing.assert_close(a, b)
    # class 0 images have mean colour (0, 0, 0) + noise: after normalisation each channel is about -mean/std
    expected = torch.tensor([-m / s for m, s in zip(dm.mean, dm.std, strict=True)])
    assert label == 0
    torch.testing.assert_close(a.mean(dim=(1, 2)), expected, atol=0.35, rtol=0)


def test_train_augmentation_changes_images(cifar_folder):
    dm = CIFARDataModule(root=str(cifar_folder), num_workers=0, pipeline="pil")
    dm.setup("fit")
    torch.manual_seed(0)
    views = torch.stack([dm.train_set[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 32, 32)
    assert not all(torch.equal(views[0], v) for v in views[1:]), "random crop/flip should vary the view"


def test_root_from_environment(cifar_folder, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(cifar_folder))
    dm = CIFARDataModule(num_workers=0)
    assert dm.root == cifar_folder
    dm.setup("test")
    assert len(dm.test_sets["cifar10"]) == 30


def test_unknown_dataset():
    with pytest.raises(ConfigError, match=r"Unknown dataset 'cifar1000'. Choose one of: cifar10, cifar100"):
        CIFARDataModule(dataset="cifar1000")


def test_missing_data_without_download(tmp_path):
    dm = CIFARDataModule(root=str(tmp_path / "nowhere"), download=False)
    dm.prepare_data()  # nothing to do when downloads are off
    with pytest.raises(DataError, match=r"CIFAR-10 not found under .*nowhere.*download is disabled"):
        dm.setup("fit")


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(CIFAR10, "download", offline)
    dm = CIFARDataModule(root=str(tmp_path / "cifar"), download=True)
    with pytest.raises(DataError, match=r"CIFAR-10 is not under .*cifar and downloading it failed .*name resolution"):
        dm.prepare_data()


def test_download_into_read_only_root(tmp_path, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: make the permission check see what a user would
        monkeypatch.setattr("lightning_ood.data.cifar_files.is_writable", lambda path: str(path) != str(read_only))
    dm = CIFARDataModule(root=str(read_only / "cifar"), download=True)
    with pytest.raises(DataError, match=r"cannot download into .*ro/cifar: .*ro is not writable"):
        dm.prepare_data()
    assert list(read_only.iterdir()) == []


def test_wrong_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    dm = CIFARDataModule(root=str(tmp_path), download=False)
    with pytest.raises(DataError, match=r"found neither 'cifar-10-batches-py/' nor 'train/' \+ 'test/'"):
        dm.setup("fit")


def test_missing_split_folder(tmp_path):
    root = make_cifar_folder(tmp_path / "copy", train=1, test=1)
    shutil.rmtree(root / "test")
    dm = CIFARDataModule(root=str(root))
    with pytest.raises(DataError, match=r"missing folder .*copy/test"):
        dm.setup("test")


def test_class_count_mismatch_in_folder(tmp_path):
    root = make_cifar_folder(tmp_path / "copy", classes=CIFAR10_CLASSES[:7], train=1, test=1)
    dm = CIFARDataModule(root=str(root))
    with pytest.raises(DataError, match=r"has 7 class folders but CIFAR-10 has 10 classes"):
        dm.setup("fit")


def test_folder_without_images(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    dm = CIFARDataModule(root=str(tmp_path))
    with pytest.raises(DataError, match="has no class folders with images"):
        dm.setup("fit")


def test_training_order_and_augmentation_depend_only_on_seed_and_epoch(cifar_folder):
    from lightning_ood.data.reproducible import EpochShuffle, SeededItems

    epoch = {"value": 0}
    sampler = EpochShuffle(10, seed=7, epoch=lambda: epoch["value"])
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    torch.manual_seed(123)  # the global RNG does not matter
    assert list(sampler) == first
    epoch["value"] = 1
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first] and {e for _, e in second} == {1}

    dm = CIFARDataModule(root=str(cifar_folder), num_workers=0, pipeline="pil")  # test_tensors.py: the tensors
    dm.setup("fit")
    items = SeededItems(dm.train_set, seed=7)
    torch.manual_seed(0)
    a = items[(3, 1)][0]
    torch.manual_seed(99)
    b = items[(3, 1)][0]
    assert torch.equal(a, b), "the same (index, epoch) gets the same crop and flip"
    assert not all(torch.equal(a, items[(3, e)][0]) for e in range(2, 8)), "other epochs get other augmentations"
