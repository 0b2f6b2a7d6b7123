"""The ImageNet benchmark on generated data: torchvision backbones behind the backbone contract, their weights (names,
files, cache, no network), ImageNetDataModule with the MOS OOD sets, and a test run through the CLI without a
checkpoint. Randomly initialised weights only; nothing is downloaded."""

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lightning_ood.data import CIFARDataModule, ImageNetDataModule
from lightning_ood.data.transforms import NORMALIZATION, eval_transform
from lightning_ood.errors import CheckpointError, ConfigError, DataError
from lightning_ood.models import build_backbone
from lightning_ood.report import paper_figure
from tests.test_cli import run_cli

MEAN, STD = NORMALIZATION["imagenet"].mean, NORMALIZATION["imagenet"].std
WNIDS = ["n01440764", "n01443537", "n01484850"]
OOD = ["inaturalist", "sun", "places", "textures"]
# name -> (feature dim, blocks, input side, the head inside torchvision's model)
BACKBONES = {
    "resnet50": (2048, 16, 64, "fc"),
    "mobilenet_v2": (1280, 17, 64, "classifier.1"),
    "vit_b_16": (768, 12, 224, "heads.head"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these batches of one or two images gain nothing from more, and OpenMP threads spinning
    against other work on a 2-core machine made this file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(BACKBONES))
def pair(request):
    """(name, our backbone, torchvision's model with the same weights), both in eval mode."""
    torch.manual_seed(0)
    name = request.param
    ours = build_backbone(name, num_classes=1000).eval()
    reference = getattr(torchvision.models, name)().eval()
    reference.load_state_dict(to_torchvision(ours.state_dict(), BACKBONES[name][3]))
    return name, ours, reference


def to_torchvision(state: dict, head: str) -> dict:
    return {k.removeprefix("net.") if k.startswith("net.") else f"{head}.{k.removeprefix('head.')}": v
            for k, v in state.items()}  # fmt: skip


# ------------------------------------------------------------------------------------------------ backbones
@torch.no_grad()
def test_backbone_contract(pair):
    name, ours, reference = pair
    dim, _, side, _ = BACKBONES[name]
    x = torch.randn(2, 3, side, side)
    features = ours.features(x)
    assert features.shape == (2, dim) and ours.feature_dim == dim and ours.num_classes == 1000
    torch.testing.assert_close(ours(x), ours.head(features))
    torch.testing.assert_close(ours(x), reference(x))  # the same network as torchvision's, head included
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    # The features are what torchvision's pooling (CNNs) or class token (ViT) hands to its head.
    captured = {}
    last = {"resnet50": "layer4", "mobilenet_v2": "features", "vit_b_16": "encoder.ln"}[name]
    handle = ours.net.get_submodule(last).register_forward_hook(lambda m, i, out: captured.update(out=out))
    ours.features(x)
    handle.remove()
    out = captured["out"]
    expected = out[:, 0] if name == "vit_b_16" else out.mean(dim=(2, 3))
    torch.testing.assert_close(features, expected)
    if name != "vit_b_16":  # after the final ReLU / ReLU6
        assert features.min() >= 0 and (name != "mobilenet_v2" or features.max() <= 6)


@torch.no_grad()
def test_blocks_in_forward_order_with_hooks(pair):
    name, ours, reference = pair
    _, count, side, _ = BACKBONES[name]
    blocks = ours.blocks()
    first, last = {
        "resnet50": ("layer1.0", "layer4.2"),
        "mobilenet_v2": ("features.1", "features.17"),
        "vit_b_16": ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_11"),
    }[name]
    names = list(blocks)
    assert len(names) == count and names[0] == first and names[-1] == last
    for block_name, block in blocks.items():  # torchvision's module names
        assert type(reference.get_submodule(block_name)) is type(block)
    order = []
    handles = [
        block.register_forward_hook(lambda m, i, out, n=n: order.append((n, out.shape[0])))
        for n, block in blocks.items()
    ]
    ours.features(torch.randn(1, 3, side, side))
    for handle in handles:
        handle.remove()
    assert order == [(n, 1) for n in blocks]


def test_vit_image_size_follows_the_weights_and_is_checked():
    vit = build_backbone("vit_b_16", num_classes=10)
    with pytest.raises(ConfigError, match=r"takes 224x224 images but got 64x64; set --data.image_size 224"):
        vit.features(torch.randn(1, 3, 64, 64))
    # IMAGENET1K_SWAG_E2E_V1 has 24 x 24 patches + the class token: a 384-px network.
    assert vit.build(10, {"encoder.pos_embedding": torch.zeros(1, 577, 768)}).image_size == 384


# ------------------------------------------------------------------------------------------------ weights
def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet50", 1000, weights="IMAGENET1K_V9")
    assert str(info.value) == (
        "Unknown weights 'IMAGENET1K_V9' for resnet50. Choose one of: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT; or give "
        "the path of a local .pth/.pt state dict."
    )


def test_pretrained_weights_need_the_imagenet_classes():
    with pytest.raises(ConfigError, match=r"MobileNet_V2_Weights.IMAGENET1K_V2 classify the 1000 ImageNet-1k classes "
                                          r"but the model is built for 3 classes"):  # fmt: skip
        build_backbone("mobilenet_v2", 3, weights="DEFAULT")


def test_missing_and_corrupt_weights_files(tmp_path):
    missing = tmp_path / "none.pth"
    with pytest.raises(CheckpointError, match=f"Weights file {missing} does not exist"):
        build_backbone("mobilenet_v2", 1000, weights=str(missing))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=f"Weights file {corrupt} cannot be read .*truncated, corrupt or not"):
        build_backbone("mobilenet_v2", 1000, weights=str(corrupt))
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match=f"{foreign} does not fit torchvision's mobilenet_v2 .* missing keys"):
        build_backbone("mobilenet_v2", 1000, weights=str(foreign))
    other_classes = tmp_path / "ten.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), other_classes)
    with pytest.raises(CheckpointError, match=r"has a head for 10 classes but the model is built for 1000"):
        build_backbone("mobilenet_v2", 1000, weights=str(other_classes))


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch.hub folder for the test."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def test_no_network_and_nothing_cached_is_one_clear_error(hub_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError) as info:
        build_backbone("mobilenet_v2", 1000, weights="DEFAULT")
    url = torchvision.models.MobileNet_V2_Weights.DEFAULT.url
    assert str(info.value) == (
        f"Cannot load the pretrained weights MobileNet_V2_Weights.IMAGENET1K_V2: {Path(url).name} is not in the cache "
        f"folder {hub_dir / 'checkpoints'} and downloading {url} failed (<urlopen error offline>). Without network "
        f"access, download the file elsewhere and copy it into {hub_dir / 'checkpoints'}, or pass --model.weights "
        f"<path to .pth> (a local state dict)."
    )


@torch.no_grad()
def test_weights_from_the_cache_and_from_local_files(hub_dir, tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(2, 3, 64, 64)
    expected = reference(x)
    # A name: read from torch.hub's cache without any network access.
    cached = hub_dir / "checkpoints" / Path(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    torch.testing.assert_close(build_backbone("mobilenet_v2", 1000, weights="imagenet1k_v1").eval()(x), expected)
    # A local file with torchvision's keys, then one with this backbone's own keys.
    torchvision_file = tmp_path / "torchvision.pth"
    torch.save(reference.state_dict(), torchvision_file)
    ours = build_backbone("mobilenet_v2", 1000, weights=str(torchvision_file)).eval()
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
    own_file = tmp_path / "own.pt"
    torch.save(ours.state_dict(), own_file)
    torch.testing.assert_close(build_backbone("mobilenet_v2", 1000, weights=str(own_file)).eval()(x), expected)


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


def test_report_maps_the_imagenet_names_to_the_paper():
    assert paper_figure("imagenet", "resnet50", "fmls", "inaturalist") == (8.91, 98.18)
    assert paper_figure("imagenet", "resnet50", "react", "Average") == (31.43, 92.95)
    assert paper_figure("imagenet", "mobilenet_v2", "msp", "sun") == (77.02, 77.1)
