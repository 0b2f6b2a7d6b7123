"""ImageNetDataModule with the MOS OOD sets on generated data (lightning_ood/data/imagenet.py), and a test run
through the CLI without a checkpoint. Randomly initialised weights only; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lightning_ood.data import CIFARDataModule, ImageNetDataModule
from lightning_ood.data.transforms import NORMALIZATION, eval_transform
from lightning_ood.errors import DataError
from tests.helpers import run_cli

MEAN, STD = NORMALIZATION["imagenet"].mean, NORMALIZATION["imagenet"].std
WNIDS = ["n01440764", "n01443537", "n01484850"]
OOD = ["inaturalist", "sun", "places", "textures"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ------------------------------------------------------------------------------------------------ data


def write_jpeg(path: Path, rng: np.random.Generator, size=(80, 64), mode: str = "RGB", colour=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), colour, np.uint8) if colour else rng.integers(0, 256, (size[1], size[0], 3))
    image = Image.fromarray(pixels.astype(np.uint8))
    (image.convert("L") if mode == "L" else image).save(path, quality=95)


def make_imagenet(root: Path, train: int = 4, val: int = 2, wnids=WNIDS) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` (64x80, one greyscale, one flat colour) and the MOS OOD folders + DTD."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for wnid in wnids:
            for i in range(count):
                write_jpeg(root / split / wnid / f"{wnid}_{i:04d}.JPEG", rng)
    write_jpeg(root / "val" / wnids[0] / f"{wnids[0]}_0000.JPEG", rng, colour=(200, 100, 50))
    write_jpeg(root / "val" / wnids[1] / f"{wnids[1]}_0000.JPEG", rng, mode="L")
    for folder in ("iNaturalist/images", "SUN/images", "Places/images", "dtd/images/banded"):
        for i in range(2):
            write_jpeg(root / folder / f"{i}.jpg", rng, size=(90, 120))
    return root


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("imagenet-generated"))


def test_imagenet_datamodule(imagenet):
    dm = ImageNetDataModule(root=str(imagenet), ood_root=str(imagenet), ood=OOD, num_workers=0, train_per_class=3)
    assert dm.num_classes == 3 and dm.classes == WNIDS and dm.image_size == 224 and dm.batch_size == 64
    dm.prepare_data()
    dm.setup("test")
    assert dm.test_set_names == ["imagenet", *OOD]
    assert [len(dm.test_sets[n]) for n in dm.test_set_names] == [6, 2, 2, 2, 2]
    for name in dm.test_set_names:
        x, label = dm.test_sets[name][0]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and label == (0 if name == "imagenet" else -1)
    flat = dm.test_sets["imagenet"][0][0]  # a flat (200, 100, 50) JPEG: each channel is (value / 255 - mean) / std
    expected = (torch.tensor([200.0, 100.0, 50.0]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(flat.mean(dim=(1, 2)), expected, atol=2 / 255 / 0.224, rtol=0)
    grey, label = dm.test_sets["imagenet"][2]  # greyscale file -> 3 channels
    assert label == 1 and grey.shape == (3, 224, 224)
    # The OOD sets get the same resize 256 + centre crop 224 as the ID images.
    assert repr(dm.ood_transform()) == repr(dm.test_sets["imagenet"].transform)
    assert "Resize(size=256" in repr(dm.ood_transform()) and "CenterCrop(size=(224, 224))" in repr(dm.ood_transform())
    dm.setup("statistics")
    images = dm.statistics_images  # the first train_per_class of each class, in sorted file order
    samples = [images.dataset.samples[i] for i in images.indices]
    assert [Path(p).name for p, c in samples if c == 0] == [f"{WNIDS[0]}_{i:04d}.JPEG" for i in range(3)]
    assert [c for _, c in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = ImageNetDataModule(root=str(imagenet), num_workers=0, train_per_class=3)
    again.setup("statistics")
    assert [again.statistics_set.samples[i] for i in again.statistics_images.indices] == samples  # deterministic
    everything = ImageNetDataModule(root=str(imagenet), num_workers=0)
    everything.setup("fit")
    assert len(everything.statistics_set) == len(everything.train_set) == 12
    assert everything.train_set[0][0].shape == (3, 224, 224)


def test_base_ood_transform_is_unchanged():
    dm = CIFARDataModule(num_workers=0)
    assert repr(dm.ood_transform()) == repr(eval_transform(dm.normalization.value, 32))


def test_missing_root_and_class_mismatch_are_clear_errors(tmp_path):
    missing = ImageNetDataModule(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(DataError) as info:
        _ = missing.num_classes  # read when the CLI links it to the model: before any setup
    message = str(info.value)
    assert f"ImageNet-1k not found under {tmp_path / 'nowhere'}" in message
    assert "<root>/val/<wnid>/*.JPEG" in message and "ILSVRC2012_img_val.tar" in message
    assert "image-net.org" in message
    with pytest.raises(DataError, match="ImageNet-1k not found under"):
        missing.setup("test")
    root = make_imagenet(tmp_path / "mismatch", train=1, val=1)
    write_jpeg(root / "train" / "n09999999" / "x.JPEG", np.random.default_rng(0))
    dm = ImageNetDataModule(root=str(root), num_workers=0)
    dm.setup("test")
    with pytest.raises(DataError, match=r"differ from those of .*val \(3\); first only in train/: n09999999, first"):
        dm.setup("statistics")


def test_torchvision_archives_are_extracted_once(tmp_path, monkeypatch):
    """Without image folders but with torchvision's archives, torchvision's ImageNet unpacks them (faked here: the
    real archives are 150 GB with checksums)."""
    for name in ("ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_val.tar", "ILSVRC2012_img_train.tar"):
        (tmp_path / name).touch()
    calls = []

    def fake_imagenet(root, split):
        calls.append(split)
        make_imagenet(Path(root) / "extracted", train=1, val=1)
        (Path(root) / "extracted" / split).rename(Path(root) / split)

    monkeypatch.setattr(torchvision.datasets, "ImageNet", fake_imagenet)
    dm = ImageNetDataModule(root=str(tmp_path), num_workers=0)
    assert dm.num_classes == 1000  # before extraction: the archives are ImageNet-1k
    dm.prepare_data()
    dm.prepare_data()
    assert calls == ["val", "train"]
    dm.setup("test")
    assert dm.num_classes == 3 and len(dm.test_sets["imagenet"]) == 3


# ------------------------------------------------------------------------------------------------ end to end


def test_cli_test_without_checkpoint(imagenet, tmp_path, caplog):
    run_cli(
        "test", "--data", "ImageNetDataModule", "--data.root", str(imagenet), "--data.ood_root", str(imagenet),
        "--data.ood", f"[{', '.join(OOD)}]", "--data.num_workers", "0", "--data.train_per_class", "2",
        "--model.backbone", "mobilenet_v2", "--model.weights", "random",  # untrained on purpose
        "--model.scorers", "[msp, energy, fmls, react]",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"),
    )  # fmt: skip
    assert "Fitted OOD statistics on 6 training images" in caplog.text  # on demand: no checkpoint holds them
    results = json.loads(next((tmp_path / "logs").rglob("ood_results.json")).read_text())
    assert results["id_dataset"] == "imagenet" and results["backbone"] == "mobilenet_v2"
    assert results["num_images"] == {"imagenet": 6, "inaturalist": 2, "sun": 2, "places": 2, "textures": 2}
    assert list(results["metrics"]) == ["msp", "energy", "fmls", "react"]
    assert all(list(per_set) == OOD for per_set in results["metrics"].values())
    assert not (tmp_path / "ckpt").exists()
