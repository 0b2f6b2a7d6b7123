"""DenseNet-BC for 32x32 inputs (Huang et al., 2017), the DenseNet of the ODIN/ReAct/DICE/LINE CIFAR benchmarks.

DenseNet-BC-100 with growth rate 12, compression 0.5 and bottleneck layers: three dense blocks of 16 layers,
24 -> 216 -> 108 -> 300 -> 150 -> 342 channels; 342-d features and about 0.77M parameters for 10 classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.models.base import Backbone, BatchNormTail


class Bottleneck(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k); the output is concatenated to the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        inter = 4 * growth
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 (compression) followed by 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(Backbone):
    """DenseNet-BC with three dense blocks; ``depth = 6n + 4`` gives ``n`` bottleneck layers per block."""

    def __init__(self, depth: int = 100, growth: int = 12, reduction: float = 0.5, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        dense, transitions = [], []
        for i in range(3):
            dense.append(nn.Sequential(*[Bottleneck(planes + j * growth, growth) for j in range(n)]))
            planes += n * growth
            if i < 2:
                out_planes = math.floor(planes * reduction)
                transitions.append(Transition(planes, out_planes))
                planes = out_planes
        self.dense = nn.ModuleList(dense)
        self.transitions = nn.ModuleList(transitions)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()  # a module, so that hooks can read the final feature map (Lee et al.'s last layer)
        self.feature_dim = planes
        self.head = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, L)
        out = self.conv1(x)
        for i, block in enumerate(self.dense):
            out = block(out)
            if i < len(self.transitions):
                out = self.transitions[i](out)
        out = self.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def blocks(self) -> dict[str, nn.Module]:
        return {f"dense{i + 1}": block for i, block in enumerate(self.dense)}

    def last_batchnorm(self) -> BatchNormTail:
        """``bn``, followed by ReLU (the final feature map) and global average pooling."""
        return BatchNormTail("bn", self.bn, (), lambda z, _: F.relu(z))

    def stages(self) -> list[str]:
        """Lee et al.'s ``feature_list`` of DenseNet3 (deep_Mahalanobis_detector ``models/densenet.py``): the stem
        convolution, each transition's output and ``relu(bn(last dense block))``."""
        return ["conv1", *(f"transitions.{i}" for i in range(len(self.transitions))), "relu"]


def densenet100(num_classes: int = 10) -> DenseNetBC:
    """DenseNet-BC-100 (k=12): 342-d features."""
    return DenseNetBC(depth=100, growth=12, reduction=0.5, num_classes=num_classes)
