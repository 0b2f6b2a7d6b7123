"""The evaluation engine without Lightning: the README's plain PyTorch loop runs as written, and the engine refuses
to score before it is fitted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood.engine import Engine
from lightning_ood.models import build_backbone

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_code(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_plain_pytorch_loop_runs():
    """The README's engine example, run as written on the CPU, with random weights instead of the download, four
    classes and a few random images instead of ImageNet."""
    code = readme_code("### The benchmark without Lightning")
    swaps = {
        'device = "cuda"': 'device = "cpu"',
        'weights="IMAGENET1K_V1"': "weights=None",
        "num_classes=1000": "num_classes=4",
    }
    for old, new in swaps.items():
        assert old in code
        code = code.replace(old, new)
    torch.manual_seed(0)
    namespace = {
        "train_images": TensorDataset(torch.rand(40, 3, 32, 32), torch.arange(40) % 4),
        "test_loader": DataLoader(TensorDataset(torch.rand(6, 3, 32, 32), torch.zeros(6)), batch_size=3),
    }
    exec(compile(code, str(README), "exec"), namespace)
    scores, logits = namespace["scores"], namespace["logits"]
    assert list(scores) == ["msp", "energy", "react", "fmls", "knn", "odin"] and logits.shape == (3, 4)
    assert all(s.shape == (3,) and torch.isfinite(s).all() for s in scores.values())


def test_an_engine_scores_only_once_fitted():
    net = build_backbone("resnet20", 4)
    engine = Engine(net, ["msp"])
    with pytest.raises(RuntimeError, match="fit"):
        engine(torch.rand(2, 3, 32, 32))
