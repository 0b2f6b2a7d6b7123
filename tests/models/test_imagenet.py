"""The ImageNet backbones (lightning_ood/models/imagenet.py): torchvision's ResNet-50, MobileNetV2 and ViT-B/16
behind the backbone contract, and their weights (names, files, cache, no network). Randomly initialised weights
only; nothing is downloaded."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from lightning_ood.errors import CheckpointError, ConfigError
from lightning_ood.models import build_backbone

# name -> (feature dim, blocks, input side, the head inside torchvision's model)
BACKBONES = {
    "resnet50": (2048, 16, 64, "fc"),
    "mobilenet_v2": (1280, 17, 64, "classifier.1"),
    "vit_b_16": (768, 12, 224, "heads.head"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


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
