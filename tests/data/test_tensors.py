"""The CIFAR tensor pipeline: decoded once, augmented per image on whole batches with tensor ops, with the same
distribution as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, and deterministic in (seed, epoch,
index); evaluation items equal the PIL pipeline's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lightning_ood.data import CIFARDataModule
from lightning_ood.data.tensors import RawBatch, crop_and_flip, mix


def reference_crop_and_flip(image: np.ndarray, dx: int, dy: int, flip: bool) -> np.ndarray:
    """torchvision's RandomCrop(padding=4) at offsets (dx, dy), then a horizontal flip, on a (C, H, W) array."""
    padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))
    crop = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
    return crop[:, :, ::-1] if flip else crop


def test_crops_and_flips_are_torchvisions_at_the_drawn_offsets():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    indices, epochs = torch.arange(1000, 1064), torch.full((64,), 3)
    out = crop_and_flip(images, seed=11, epochs=epochs, indices=indices)
    draw = mix(11, epochs, indices)
    for i in range(64):
        dx, dy, flip = int(draw[i] % 9), int((draw[i] // 9) % 9), bool((draw[i] // 81) % 2)
        np.testing.assert_array_equal(out[i].numpy(), reference_crop_and_flip(images[i].numpy(), dx, dy, flip))


def test_the_draws_are_uniform_and_depend_only_on_seed_epoch_index():
    indices = torch.arange(90_000)
    draw = mix(0, torch.zeros_like(indices), indices)
    dx, dy, flip = draw % 9, (draw // 9) % 9, (draw // 81) % 2
    for values, k in ((dx, 9), (dy, 9), (flip, 2)):
        counts = torch.bincount(values, minlength=k).double()
        expected = len(indices) / k
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 30, (k, counts.tolist())  # uniform: the 99.9% quantile of chi2(8) is 26.1
    joint = torch.bincount(dx * 9 + dy, minlength=81).double()
    assert float(((joint - len(indices) / 81) ** 2 / (len(indices) / 81)).sum()) < 140  # chi2(80): 99.9% at 124.8
    assert torch.equal(mix(5, torch.full((10,), 2), torch.arange(10)), mix(5, torch.full((10,), 2), torch.arange(10)))
    assert not torch.equal(
        mix(5, torch.full((10,), 2), torch.arange(10)), mix(5, torch.full((10,), 3), torch.arange(10))
    )
    assert not torch.equal(
        mix(5, torch.full((10,), 2), torch.arange(10)), mix(6, torch.full((10,), 2), torch.arange(10))
    )


def test_training_batches_are_decoded_once_and_augmented_on_the_device(cifar_folder, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything sets
    dm = CIFARDataModule(root=str(cifar_folder), batch_size=16, num_workers=0)
    dm.setup("fit")
    assert dm.train_set.images is dm.statistics_set.images  # one decoded tensor for training and statistics
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, RawBatch) and batch.images.dtype == torch.uint8 and batch.images.shape == (16, 3, 32, 32)
    x, y = dm.on_after_batch_transfer(batch, 0)
    again, _ = dm.on_after_batch_transfer(RawBatch(*batch), 0)
    assert torch.equal(x, again)  # the same (seed, epoch, index): the same crops and flips
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    raw = crop_and_flip(batch.images, 7, batch.epochs, batch.indices).float() / 255
    torch.testing.assert_close(x, (raw - mean) / std)  # normalised with the normalisation in force
    assert torch.equal(y, batch.labels)


@pytest.mark.parametrize("split", ["statistics", "test"])
def test_evaluation_items_equal_the_pil_pipelines(cifar_folder, split):
    tensors = CIFARDataModule(root=str(cifar_folder), num_workers=0)
    pil = CIFARDataModule(root=str(cifar_folder), num_workers=0, pipeline="pil")
    for dm in (tensors, pil):
        dm.setup("fit" if split == "statistics" else "test")
    a = tensors.statistics_set if split == "statistics" else tensors.test_sets["cifar10"]
    b = pil.statistics_set if split == "statistics" else pil.test_sets["cifar10"]
    assert len(a) == len(b)
    for i in (0, 7, len(a) - 1):
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=1e-6)
        assert a[i][1] == b[i][1]


def test_decoded_folders_are_cached(cifar_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = CIFARDataModule(root=str(cifar_folder), num_workers=0, decoded_cache=str(tmp_path))
    first.setup("fit")
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.pt")) == ["decoded_cifar10_train"]
    second = CIFARDataModule(root=str(cifar_folder), num_workers=0, decoded_cache=str(tmp_path))
    second.setup("fit")
    assert "cifar10_train: 60 decoded images from the cache" in caplog.text
    assert torch.equal(first.train_set.images, second.train_set.images)


def test_a_changed_file_invalidates_the_decoded_cache(cifar_folder, tmp_path, caplog):
    import shutil

    from PIL import Image

    folder = tmp_path / "copy"
    shutil.copytree(cifar_folder, folder)
    CIFARDataModule(root=str(folder), num_workers=0, decoded_cache=str(tmp_path / "cache")).setup("fit")
    first = sorted(folder.glob("train/*/*.png"))[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(first)  # one training image replaced
    caplog.set_level(logging.INFO)
    again = CIFARDataModule(root=str(folder), num_workers=0, decoded_cache=str(tmp_path / "cache"))
    again.setup("fit")
    assert "from the cache" not in caplog.text
    from lightning_ood.data.cifar_files import cifar_split

    position = [path for path, _ in cifar_split("cifar10", folder, True, None).samples].index(str(first))
    assert again.train_set.images[position].flatten(1).float().mean(1).tolist() == [255.0, 0.0, 0.0]


def test_images_that_are_not_32_pixels_are_refused(tmp_path):
    from lightning_ood.errors import DataError
    from tests.conftest import make_cifar_folder

    folder = make_cifar_folder(tmp_path / "big", train=1, test=1, size=40)
    with pytest.raises(DataError, match="the images are 40x40, CIFAR's are 32x32"):
        CIFARDataModule(root=str(folder), num_workers=0).setup("fit")


def test_held_out_images_keep_their_dataset_index(cifar_folder, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    dm = CIFARDataModule(root=str(cifar_folder), batch_size=64, num_workers=0, val_split=10)
    dm.setup("fit")
    kept = dm.kept_indices()
    batch = next(iter(dm.train_dataloader()))
    assert len(batch.indices) == 50 and set(batch.indices.tolist()) == set(kept)  # one epoch: every kept image once
    assert torch.equal(batch.images, dm.train_set.images[batch.indices])  # the pixels of those dataset indices
