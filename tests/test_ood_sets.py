import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ood.data import CIFARDataModule, DemoDataModule
from lightning_ood.data.ood import build_ood_set, ood_entry
from lightning_ood.data.sets import NoiseImages
from lightning_ood.data.transforms import NORMALIZATION, eval_transform
from lightning_ood.errors import ConfigError, DataError
from tests.conftest import shared_data

MEAN, STD = NORMALIZATION["cifar10"].mean, NORMALIZATION["cifar10"].std
TRANSFORM = eval_transform(NORMALIZATION["cifar10"], 32)
SHAPE = (3, 32, 32)


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


def test_demo_datamodule():
    dm = DemoDataModule()
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 6 and dm.id_name == "digits_0_5"
    assert dm.test_set_names == ["digits_0_5", "digits_6_9", "faces", "textures", "photos"]
    sizes = {name: len(ds) for name, ds in dm.test_sets.items()}
    assert sizes["faces"] == 100 and sizes["textures"] == 300 and sizes["photos"] == 400
    assert sizes["digits_6_9"] == 714  # digits 6-9 of scikit-learn's 1,797 (181 + 179 + 174 + 180)
    assert len(dm.train_set) + sizes["digits_0_5"] == 1797 - 714
    train_labels = set(dm.train_labels.tolist())
    assert train_labels == set(range(6))
    for dataset in dm.test_sets.values():
        x, _ = dataset[0]
        assert x.shape == (3, 32, 32)
    x, _ = dm.statistics_set[0]
    assert abs(float(torch.stack([dm.statistics_set[i][0] for i in range(200)]).mean())) < 0.2  # normalised


def test_shared_data_sets():
    root = shared_data()
    tin = build_ood_set("tin", TRANSFORM, SHAPE, root, image_list=str(root / "openood-lists/cifar10_test_tin.txt"))
    mnist = build_ood_set("mnist", TRANSFORM, SHAPE, root)
    fashion = build_ood_set("fashion_mnist", TRANSFORM, SHAPE, root)
    assert (len(tin), len(mnist), len(fashion)) == (7793, 10000, 10000)
    assert tin[0][0].shape == mnist[0][0].shape == fashion[0][0].shape == SHAPE
