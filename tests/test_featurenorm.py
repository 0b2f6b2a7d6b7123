"""FeatureNorm, jigsaw and NormRatio block selection (Yu et al., CVPR 2023)."""

import math

import pytest
import torch
from torch import nn

from lightning_ood.errors import ConfigError
from lightning_ood.hooks import block_outputs
from lightning_ood.models import build_backbone
from lightning_ood.models.base import Backbone
from lightning_ood.scoring import build_scorer
from lightning_ood.scoring.base import Batch
from lightning_ood.scoring.featurenorm import feature_norm, jigsaw, norm_ratios


def test_feature_norm_by_hand():
    # channel 0: ReLU -> [1, 0, 2, 0], norm sqrt(5); channel 1: [3, 4, 0, 0], norm 5 -> mean (sqrt(5) + 5) / 2
    x = torch.tensor([[[[1.0, -2.0], [2.0, 0.0]], [[3.0, 4.0], [0.0, -1.0]]]])
    assert feature_norm(x).item() == pytest.approx((math.sqrt(5) + 5) / 2)
    # a second image scaled by 2 has twice the norm; tokens (N, T, D) use T as the spatial axis
    assert feature_norm(torch.cat([x, 2 * x])).tolist() == pytest.approx([(math.sqrt(5) + 5) / 2, math.sqrt(5) + 5])
    tokens = torch.tensor([[[3.0, -1.0], [4.0, 2.0]]])  # (1, T=2, D=2): D0 -> [3, 4] norm 5, D1 -> [0, 2] norm 2
    assert feature_norm(tokens).item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="FeatureNorm needs"):
        feature_norm(torch.ones(2, 3))


def tiles(image: torch.Tensor, grid: int = 3) -> list[torch.Tensor]:
    _, h, w = image.shape
    th, tw = h // grid, w // grid
    return [image[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r in range(grid) for c in range(grid)]


def test_jigsaw_tiles_are_a_permutation_of_the_original_tiles():
    images = torch.randn(4, 3, 32, 32)
    shuffled = jigsaw(images, [torch.Generator().manual_seed(i) for i in range(4)])
    orders = []
    for original, scrambled in zip(images, shuffled, strict=True):
        before, after = tiles(original), tiles(scrambled)
        used = [next(j for j, t in enumerate(before) if torch.equal(t, a)) for a in after]
        assert sorted(used) == list(range(9)), "every tile appears exactly once"
        assert (scrambled[:, 30:, :] == 0).all() and (scrambled[:, :, 30:] == 0).all()  # 10-pixel tiles: 2 px border
        orders.append(used)
    assert any(order != list(range(9)) for order in orders), "the tiles are actually moved"
    again = jigsaw(images, [torch.Generator().manual_seed(i) for i in range(4)])
    assert torch.equal(shuffled, again), "seeded"


class Designed(Backbone):
    """Three blocks with known NormRatios on ramp images x[..., j] = j / 31:
    - ``copy``: ReLU(x): the jigsaw loses the 2-pixel border, so the ratio is a bit above 1;
    - ``aligned``: ReLU(x * ramp): largest when the ramp lines up with itself (rearrangement inequality), so
      shuffling lowers its norm most: the designed choice;
    - ``flipped``: ReLU(x * (1 - ramp)): anti-aligned, shuffling raises its norm: ratio below 1."""

    def __init__(self) -> None:
        super().__init__()
        ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)
        self.register_buffer("ramp", ramp)
        self.copy, self.aligned, self.flipped = nn.Identity(), nn.Identity(), nn.Identity()
        self.feature_dim = 3
        self.head = nn.Linear(3, 2)

    def blocks(self):
        return {"copy": self.copy, "aligned": self.aligned, "flipped": self.flipped}

    def features(self, x):
        a = self.copy(x.relu())
        b = self.aligned((x * self.ramp).relu())
        c = self.flipped((x * (1 - self.ramp)).relu())
        return (a + b + c).mean(dim=(2, 3))


def test_normratio_picks_the_designed_block():
    images = torch.linspace(0, 1, 32).expand(40, 3, 32, 32).clone()
    loader = [(images[i : i + 8], torch.zeros(8), torch.arange(i, i + 8)) for i in range(0, 40, 8)]
    result = norm_ratios(Designed(), loader)
    assert result.images == 40
    assert result.selected == "aligned"
    assert result.ratios["aligned"] > result.ratios["copy"] > 1.0 > result.ratios["flipped"]
    assert result.to_csv().splitlines()[0] == "block,norm_ratio,selected"
    assert "aligned," in result.to_csv() and result.to_csv().count(",1\n") == 1
    # batching does not change the result: per-image jigsaws are seeded by dataset index
    single = norm_ratios(Designed(), [(images, torch.zeros(40), torch.arange(40))])
    assert single.ratios == pytest.approx(result.ratios, rel=1e-12)


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


def test_featurenorm_scorer():
    scorer = build_scorer("featurenorm", block="layer4.0")
    assert scorer.needs.blocks == ("layer4.0",)
    outputs = {"layer4.0": torch.tensor([[[[1.0, -2.0], [2.0, 0.0]], [[3.0, 4.0], [0.0, -1.0]]]])}
    assert scorer(Batch(torch.ones(1, 3), torch.ones(1, 2), outputs)).item() == pytest.approx((math.sqrt(5) + 5) / 2)
    with pytest.raises(NotImplementedError, match="Batch"):
        scorer.score(torch.ones(1, 3), torch.ones(1, 2))
