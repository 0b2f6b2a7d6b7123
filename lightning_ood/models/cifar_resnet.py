"""ResNets for 32x32 inputs: a 3x3 stem without max-pooling, as in the CIFAR OOD literature.

ResNet-18 (He et al., 2016, in the CIFAR variant used by ReAct/DICE/LINE and the paper) has 512-d features and about
11.2M parameters; ResNet-20 (the original CIFAR ResNet, 3 stages of 16/32/64 channels) has 64-d features and about
0.27M parameters, for quick CPU runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.models.base import Backbone, BatchNormTail


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projection shortcut when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """A stack of residual stages on a 3x3 stem; ``widths[i]`` channels and ``depths[i]`` blocks in stage ``i``."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (depth - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(stages)
        self.feature_dim = in_planes
        self.head = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, L)
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.layers:
            out = stage(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # blocks end in ReLU: features are >= 0

    def blocks(self) -> dict[str, nn.Module]:
        return {f"layer{i + 1}.{j}": block for i, stage in enumerate(self.layers) for j, block in enumerate(stage)}

    def last_batchnorm(self) -> BatchNormTail:
        """``bn2`` of the last block, followed by the residual addition, ReLU and global average pooling."""
        last = f"layers.{len(self.layers) - 1}.{len(self.layers[-1]) - 1}"
        block = self.layers[-1][-1]
        shortcut = f"{last}.shortcut"

        def activation(z: Tensor, captured: dict[str, Tensor]) -> Tensor:
            return F.relu(z + captured[shortcut])

        return BatchNormTail(f"{last}.bn2", block.bn2, (shortcut,), activation)

    def stages(self) -> list[str]:
        """Lee et al.'s ``feature_list`` of their ResNet (deep_Mahalanobis_detector ``models/resnet.py``): the stem
        ``relu(bn1(conv1(x)))`` (the first stage's input) and every stage's output."""
        return ["layers.0:input", *(f"layers.{i}" for i in range(len(self.layers)))]


def resnet18(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-18: 4 stages of 64/128/256/512 channels, 2 blocks each; 512-d features."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20: 3 stages of 16/32/64 channels, 3 blocks each; 64-d features."""
    return CifarResNet((16, 32, 64), (3, 3, 3), num_classes)
