"""Independent re-implementations that tests in several folders compare against: the paper's FPR95
(``paper_fpr``), class means, and the published networks' layouts and forward passes (DICE's DenseNet3,
OpenOOD's ResNet18_32x32), each written from the original's definition."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------------------------ metrics


def paper_fpr(is_id: np.ndarray, scores: np.ndarray, recall_level: float = 0.95) -> float:
    """``fpr_and_fdr_at_recall``: distinct scores high to low, cut where every ID score is kept, reversed (low to
    high), then the first ``argmin |recall - recall_level|``; FPR = OOD scores >= that threshold / OOD scores."""
    positive = is_id == 1
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positive = scores[order], positive[order]
    threshold_idxs = np.r_[np.where(np.diff(scores))[0], positive.size - 1]
    tps = np.cumsum(positive, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    reverse = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[reverse], 1], np.r_[fps[reverse], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return float(fps[cutoff] / np.sum(~positive))


# --------------------------------------------------------------------------------------------------------- statistics


def ref_class_means(train: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    means = np.zeros((num_classes, train.shape[1]))
    for c in range(num_classes):
        rows = [train[i] for i in range(len(train)) if labels[i] == c]
        means[c] = np.sum(rows, axis=0) / len(rows)
    return means


# ------------------------------------------------------------------------------------------------- published networks


def bn_state(prefix: str, channels: int, g: torch.Generator) -> dict[str, Tensor]:
    return {
        f"{prefix}.weight": torch.rand(channels, generator=g) + 0.5,
        f"{prefix}.bias": torch.randn(channels, generator=g) * 0.1,
        f"{prefix}.running_mean": torch.randn(channels, generator=g) * 0.1,
        f"{prefix}.running_var": torch.rand(channels, generator=g) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(100),
    }


def conv(out: int, inp: int, k: int, g: torch.Generator) -> Tensor:
    return torch.randn(out, inp, k, k, generator=g) * math.sqrt(2.0 / (inp * k * k))


def densenet3_state(classes: int = 10, seed: int = 0) -> dict[str, Tensor]:
    """A random state dict in the layout of the ODIN / DICE ``DenseNet3`` (depth 100, growth 12, reduction 0.5)."""
    g = torch.Generator().manual_seed(seed)
    growth, n, planes = 12, 16, 24
    state = {"conv1.weight": conv(planes, 3, 3, g)}
    for b in (1, 2, 3):
        for j in range(n):
            p = f"block{b}.layer.{j}"
            state |= bn_state(f"{p}.bn1", planes, g)
            state[f"{p}.conv1.weight"] = conv(4 * growth, planes, 1, g)
            state |= bn_state(f"{p}.bn2", 4 * growth, g)
            state[f"{p}.conv2.weight"] = conv(growth, 4 * growth, 3, g)
            planes += growth
        if b < 3:
            out = planes // 2
            state |= bn_state(f"trans{b}.bn1", planes, g)
            state[f"trans{b}.conv1.weight"] = conv(out, planes, 1, g)
            planes = out
    state |= bn_state("bn1", planes, g)
    state["fc.weight"] = torch.randn(classes, planes, generator=g) * 0.1
    state["fc.bias"] = torch.randn(classes, generator=g) * 0.1
    return state


def bn(x: Tensor, s: dict[str, Tensor], p: str) -> Tensor:
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"], False)


def densenet3_forward(s: dict[str, Tensor], x: Tensor, change=lambda z: z) -> tuple[Tensor, Tensor]:
    """DenseNet3.forward written from the original's definition: conv1, three dense blocks of BN-ReLU-1x1-BN-ReLU-3x3
    bottlenecks concatenated, BN-ReLU-1x1 + avg_pool(2) transitions, BN-ReLU, avg_pool(8), fc. Returns (h, logits);
    ``change`` is applied to the final BatchNorm's output (BATS)."""
    out = F.conv2d(x, s["conv1.weight"], padding=1)
    for b in (1, 2, 3):
        j = 0
        while f"block{b}.layer.{j}.conv1.weight" in s:
            p = f"block{b}.layer.{j}"
            y = F.conv2d(F.relu(bn(out, s, f"{p}.bn1")), s[f"{p}.conv1.weight"])
            y = F.conv2d(F.relu(bn(y, s, f"{p}.bn2")), s[f"{p}.conv2.weight"], padding=1)
            out = torch.cat([out, y], 1)
            j += 1
        if b < 3:
            out = F.avg_pool2d(F.conv2d(F.relu(bn(out, s, f"trans{b}.bn1")), s[f"trans{b}.conv1.weight"]), 2)
    out = F.relu(change(bn(out, s, "bn1")))
    h = F.avg_pool2d(out, 8).view(len(x), -1)
    return h, F.linear(h, s["fc.weight"], s["fc.bias"])


def openood_resnet18_state(classes: int = 10, seed: int = 0) -> dict[str, Tensor]:
    """A random state dict in the layout of OpenOOD v1.5's ``ResNet18_32x32``."""
    g = torch.Generator().manual_seed(seed)
    state = {"conv1.weight": conv(64, 3, 3, g)} | bn_state("bn1", 64, g)
    inp = 64
    for i, width in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p = f"layer{i}.{j}"
            state[f"{p}.conv1.weight"] = conv(width, inp, 3, g)
            state |= bn_state(f"{p}.bn1", width, g)
            state[f"{p}.conv2.weight"] = conv(width, width, 3, g)
            state |= bn_state(f"{p}.bn2", width, g)
            if inp != width:
                state[f"{p}.shortcut.0.weight"] = conv(width, inp, 1, g)
                state |= bn_state(f"{p}.shortcut.1", width, g)
            inp = width
    state["fc.weight"] = torch.randn(classes, 512, generator=g) * 0.1
    state["fc.bias"] = torch.randn(classes, generator=g) * 0.1
    return state
