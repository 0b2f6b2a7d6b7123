"""lightning_ood/features.py: the feature cache, its reuse and invalidation."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_ood.features import FeatureCache, extract_features
from lightning_ood.models import build_backbone


def test_feature_cache_reuse_and_invalidation(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet20", 4)
    data = TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 4)
    cache = FeatureCache(tmp_path)
    first, hit = cache.get("set", backbone, data, progress=False)
    assert not hit and first.features.shape == (10, 64) and first.logits.shape == (10, 4)
    again, hit = cache.get("set", backbone, data, progress=False)
    assert hit and torch.equal(again.features, first.features)
    direct = extract_features(backbone, data, progress=False)
    torch.testing.assert_close(direct.features, first.features)
    # new weights -> a new entry
    with torch.no_grad():
        backbone.head.weight.add_(1.0)
    _, hit = cache.get("set", backbone, data, progress=False)
    assert not hit
    # new images -> a new entry
    changed = TensorDataset(data.tensors[0] + 1, data.tensors[1])
    _, hit = cache.get("set", backbone, changed, progress=False)
    assert not hit
    assert len(list(tmp_path.glob("set-*.pt"))) == 3


def test_feature_cache_sees_file_and_transform_changes(tmp_path):
    from PIL import Image

    from lightning_ood.data.sets import ImageFiles
    from lightning_ood.data.transforms import Normalization, eval_transform

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i}.png")
    paths = sorted(folder.glob("*.png"))
    backbone = build_backbone("resnet20", 4)
    cache = FeatureCache(tmp_path / "cache")
    base = ImageFiles(paths, eval_transform(Normalization((0.5,) * 3, (0.25,) * 3), 32))
    assert cache.get("imgs", backbone, base, progress=False)[1] is False
    assert cache.get("imgs", backbone, base, progress=False)[1] is True
    other_transform = ImageFiles(paths, eval_transform(Normalization((0.5,) * 3, (0.3,) * 3), 32))
    assert cache.get("imgs", backbone, other_transform, progress=False)[1] is False
    Image.new("RGB", (40, 40), (9, 9, 9)).save(paths[0])  # the same file name, new content
    assert cache.get("imgs", backbone, base, progress=False)[1] is False


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    backbone = build_backbone("resnet20", 4)
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    cache = FeatureCache(tmp_path)
    cache.get("x", backbone, data, progress=False)
    (entry,) = tmp_path.glob("x-*.pt")
    entry.write_bytes(b"truncated")
    result, hit = cache.get("x", backbone, data, progress=False)
    assert not hit and result.features.shape == (4, 64)
