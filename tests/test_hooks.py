"""lightning_ood/hooks.py: block outputs read by forward hooks, the backbone unchanged."""

from __future__ import annotations

import pytest
import torch

from lightning_ood.errors import ConfigError
from lightning_ood.hooks import block_outputs
from lightning_ood.models import build_backbone


def test_block_hooks_read_outputs_without_changing_the_backbone():
    model = build_backbone("resnet18", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.features(x)
        with block_outputs(model, ["layer4.0", "layer2.1"]) as captured:
            hooked = model.features(x)
        assert torch.equal(plain, hooked)
        assert captured["layer4.0"].shape == (2, 512, 4, 4) and captured["layer2.1"].shape == (2, 128, 16, 16)
        # hooks are removed afterwards
        model.features(x)
    assert all(not block._forward_hooks for block in model.blocks().values())
    with pytest.raises(ConfigError, match=r"Unknown block\(s\) \['layer9.0'\]"), block_outputs(model, ["layer9.0"]):
        pass
