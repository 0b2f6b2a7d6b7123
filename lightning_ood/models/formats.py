"""Published CIFAR weights in their authors' layouts, converted exactly into this project's backbones.

``model.weights: PATH`` loads a file in any of these formats, recognised from its keys (``model.weights_format``
names one explicitly when a file fits several):

- ``densenet3``: the DenseNet-BC-100 of the ODIN / ReAct / DICE / LINE / HIMPLoS code (class ``DenseNet3``; keys
  ``conv1``, ``block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2}``, ``trans{1,2}.{bn1,conv1}``, ``bn1``, ``fc``), as the
  ``.pth.tar`` files of the DICE repository (``{'epoch', 'state_dict'}``) or a bare state dict, with or without the
  ``module.`` prefix of ``DataParallel``. The original computes ``fc(avg_pool2d(relu(bn1(block3(...))), 8))``: the
  same layers in the same order as :class:`~lightning_ood.models.densenet.DenseNetBC`, whose 342-d pooled feature is
  the paper's h(x). Its authors normalise CIFAR-10 and CIFAR-100 alike with mean (0.4914, 0.4822, 0.4465) and std
  (0.2023, 0.1994, 0.2010) (DICE ``ood_eval.py``; HIMPLoS ``utils/data_loader.py``).
- ``openood_resnet18``: OpenOOD v1.5's ``ResNet18_32x32`` (``best.ckpt``, a plain state dict; keys ``conv1``,
  ``bn1``, ``layer{1..4}.N.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}``, ``fc``): the same CIFAR ResNet-18 as
  :class:`~lightning_ood.models.cifar_resnet.CifarResNet`. OpenOOD normalises with its ``normalization_dict``
  (``openood/preprocessors/transform.py``): CIFAR-10 mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616);
  CIFAR-100 mean (0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761).
- ``lightning_ood``: a Lightning checkpoint of this project (``fit`` or ``lightning-ood import``): the backbone's
  weights, the normalisation it was trained or imported with, and its OOD statistics.
- ``state_dict``: a plain state dict of this project's backbone (``backbone.state_dict()``, optionally with the
  ``backbone.`` prefix of the LightningModule); the normalisation is the dataset's unless configured.

A file that fits none is refused with the closest format's missing and unexpected keys and shape mismatches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_ood.checkpoints import load_file
from lightning_ood.errors import CheckpointError, ConfigError
from lightning_ood.normalization import Normalization
from lightning_ood.statistics import FeatureStatistics

StateDict = dict[str, Tensor]

DICE_NORMALIZATION = Normalization(
    (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "the DICE / ODIN DenseNet authors' CIFAR normalisation"
)
OPENOOD_NORMALIZATION = {
    10: Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "OpenOOD v1.5's CIFAR-10 normalisation"),
    100: Normalization((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), "OpenOOD v1.5's CIFAR-100 normalisation"),
}


# ------------------------------------------------------------------------------------------------ key renaming
def _densenet3_key(key: str) -> str | None:
    """DenseNet3 key -> DenseNetBC key (``None`` for a key the format does not have)."""
    if m := re.fullmatch(r"block([123])\.layer\.(\d+)\.((?:bn1|bn2)\.\w+|(?:conv1|conv2)\.weight)", key):
        return f"dense.{int(m[1]) - 1}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"trans([12])\.bn1\.(\w+)", key):
        return f"transitions.{int(m[1]) - 1}.bn.{m[2]}"
    if m := re.fullmatch(r"trans([12])\.conv1\.weight", key):
        return f"transitions.{int(m[1]) - 1}.conv.weight"
    if m := re.fullmatch(r"bn1\.(\w+)", key):
        return f"bn.{m[1]}"
    if m := re.fullmatch(r"fc\.(weight|bias)", key):
        return f"head.{m[1]}"
    return "conv1.weight" if key == "conv1.weight" else None


def _openood_resnet_key(key: str) -> str | None:
    """OpenOOD ResNet18_32x32 key -> CifarResNet key."""
    block_key = r"layer([1-4])\.(\d+)\.((?:conv1|conv2|shortcut\.0)\.weight|(?:bn1|bn2|shortcut\.1)\.\w+)"
    if m := re.fullmatch(block_key, key):
        return f"layers.{int(m[1]) - 1}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"fc\.(weight|bias)", key):
        return f"head.{m[1]}"
    if key == "conv1.weight" or re.fullmatch(r"bn1\.\w+", key):
        return key
    return None


def _own_key(key: str) -> str | None:
    return key.removeprefix("backbone.")


@dataclass(frozen=True)
class WeightsFormat:
    """A layout of published weights.

    Attributes:
        name: the value of ``model.weights_format``.
        title: what the file is, for messages.
        backbone: the backbone it converts into (``None``: whichever this project's backbone is configured).
        markers: keys (after the ``module.`` prefix is removed) that identify the format; all must be present.
        rename: original key -> this project's backbone key (``None``: not a key of this format).
        normalization: class count -> the normalisation its authors trained with (``None``: the dataset's).
    """

    name: str
    title: str
    backbone: str | None
    markers: tuple[str, ...]
    rename: Callable[[str], str | None]
    normalization: Callable[[int], Normalization | None]

    def recognises(self, keys: set[str]) -> bool:
        return all(m in keys for m in self.markers)


FORMATS: dict[str, WeightsFormat] = {
    "densenet3": WeightsFormat(
        "densenet3",
        "a DenseNet3 (ODIN / ReAct / DICE / LINE / HIMPLoS code) DenseNet-BC state dict",
        "densenet100",
        ("block1.layer.0.conv1.weight", "trans1.conv1.weight", "bn1.weight", "fc.weight"),
        _densenet3_key,
        lambda classes: DICE_NORMALIZATION,
    ),
    "openood_resnet18": WeightsFormat(
        "openood_resnet18",
        "an OpenOOD v1.5 ResNet18_32x32 state dict",
        "resnet18",
        ("layer1.0.conv1.weight", "layer2.0.shortcut.0.weight", "layer4.1.bn2.weight", "fc.weight"),
        _openood_resnet_key,
        lambda classes: OPENOOD_NORMALIZATION.get(classes),
    ),
    "lightning_ood": WeightsFormat(
        "lightning_ood", "a Lightning checkpoint of this project", None, (), _own_key, lambda classes: None
    ),
    "state_dict": WeightsFormat(
        "state_dict", "a state dict of this project's backbone", None, (), _own_key, lambda classes: None
    ),
}


@dataclass
class LoadedWeights:
    """Converted weights ready for ``backbone.load_state_dict``, and what came with them."""

    state: StateDict
    format: WeightsFormat
    path: Path
    normalization: Normalization | None = None
    statistics: dict[str, Any] | None = None

    def describe(self) -> str:
        return f"{self.path} ({self.format.name}: {self.format.title})"


# ------------------------------------------------------------------------------------------------ reading
def read_container(path: Path) -> tuple[StateDict, dict[str, Any]]:
    """The state dict inside a weights file and the container around it (``{}`` for a bare state dict)."""
    loaded = load_file(path, "Weights file", "state dict or checkpoint")
    container: dict[str, Any] = {}
    for key in ("state_dict", "model", "net"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            container, loaded = dict(loaded), loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(
            f"Weights file {path} does not hold a state dict (a mapping of parameter names to tensors), nor one "
            f"under 'state_dict' or 'model'."
        )
    state = dict(loaded)
    if "pytorch-lightning_version" in container:  # this project's LightningModule: only the backbone is weights
        state = {k: v for k, v in state.items() if k.startswith("backbone.")} or state
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, container


def candidate_formats(state: StateDict, container: dict[str, Any], expected: StateDict) -> list[WeightsFormat]:
    """The formats whose keys the file has."""
    keys = set(state)
    found = [f for f in FORMATS.values() if f.markers and f.recognises(keys)]
    if {_own_key(k) for k in keys} == set(expected):
        found.append(FORMATS["lightning_ood" if "pytorch-lightning_version" in container else "state_dict"])
    return found


def convert(state: StateDict, fmt: WeightsFormat) -> tuple[StateDict, list[str]]:
    """Renamed state dict and the keys the format does not know."""
    converted, unknown = {}, []
    for key, value in state.items():
        new = fmt.rename(key)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    return converted, unknown


def mismatches(converted: StateDict, unknown: list[str], expected: StateDict) -> list[str]:
    """Human-readable differences between converted weights and the backbone's own state dict."""
    missing = sorted(expected.keys() - converted.keys())
    unexpected = sorted(unknown + sorted(converted.keys() - expected.keys()))
    shapes = sorted(
        f"{k} {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected.keys() & converted.keys()
        if converted[k].shape != expected[k].shape
    )
    return [
        f"{len(items)} {what} (first: {', '.join(items[:3])})"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]


def load_checked(net: nn.Module, state: StateDict, head_key: str, source: str, fits: str) -> None:
    """``net.load_state_dict(state)`` with one readable message instead of PyTorch's list of every mismatch: the head's
    class count first, then the missing and unexpected keys and shape mismatches (``fits``: what ``state`` should be).
    """
    expected = net.state_dict()
    classes = expected[head_key].shape[0]
    if head_key in state and state[head_key].shape[0] != classes:
        raise CheckpointError(
            f"{source} has a head for {state[head_key].shape[0]} classes but the model is built for {classes} "
            f"(model.num_classes, linked from the data). Use weights trained on this dataset."
        )
    problems = mismatches(state, [], expected)
    if problems:
        raise CheckpointError(f"{source} does not fit {fits}: {'; '.join(problems)}.")
    net.load_state_dict(state)


def load_weights(
    path: str | Path, backbone: nn.Module, backbone_name: str, weights_format: str | None = None
) -> LoadedWeights:
    """Read ``path``, recognise (or check) its format, convert it for ``backbone`` (this project's ``backbone_name``)
    and check every key and shape; nothing is loaded yet.

    Raises:
        CheckpointError: unreadable file, no or several matching formats, another architecture or class count, or
            missing / unexpected keys and shape mismatches.
        ConfigError: an unknown ``weights_format``.
    """
    path = Path(path).expanduser()
    if weights_format is not None and weights_format not in FORMATS:
        raise ConfigError(f"Unknown weights format {weights_format!r}. Choose one of: {', '.join(FORMATS)}.")
    state, container = read_container(path)
    expected = backbone.state_dict()
    if weights_format is not None:
        fmt = FORMATS[weights_format]
    else:
        found = candidate_formats(state, container, expected)
        if len(found) > 1:
            raise CheckpointError(
                f"Weights file {path} fits several formats ({', '.join(f.name for f in found)}); name one with "
                f"--model.weights_format."
            )
        if not found:
            raise unrecognised(path, state, expected)
        fmt = found[0]
    if fmt.backbone is not None and fmt.backbone != backbone_name and weights_format is not None:
        raise ConfigError(
            f"model.weights_format {fmt.name} ({fmt.title}) converts into the {fmt.backbone!r} backbone but "
            f"model.backbone is {backbone_name!r}: name the format of {path}, or leave model.weights_format unset."
        )
    if fmt.backbone is not None and fmt.backbone != backbone_name:
        raise CheckpointError(
            f"Weights file {path} is {fmt.title}, which converts into the {fmt.backbone!r} backbone, but "
            f"model.backbone is {backbone_name!r}; set --model.backbone {fmt.backbone}."
        )
    hyper = container.get("hyper_parameters") or {}
    if fmt.name == "lightning_ood" and hyper.get("backbone") not in (None, backbone_name):
        raise CheckpointError(
            f"Weights file {path} is a checkpoint of a {hyper['backbone']!r} backbone but model.backbone is "
            f"{backbone_name!r}; set --model.backbone {hyper['backbone']}."
        )
    converted, unknown = convert(state, fmt)
    head = converted.get("head.weight")
    classes = expected["head.weight"].shape[0]
    if head is not None and head.shape[0] != classes:
        raise CheckpointError(
            f"Weights file {path} has a head for {head.shape[0]} classes but the data has {classes} classes "
            f"(model.num_classes is linked from the data); evaluate it on the dataset it was trained on."
        )
    problems = mismatches(converted, unknown, expected)
    if problems:
        raise CheckpointError(
            f"Weights file {path} does not fit {fmt.title} for the {backbone_name!r} backbone: {'; '.join(problems)}."
        )
    normalization = fmt.normalization(classes)
    if fmt.name == "lightning_ood" and container.get("input_normalization"):
        normalization = Normalization.from_dict(container["input_normalization"])
    statistics = container.get("ood_statistics") if fmt.name == "lightning_ood" else None
    return LoadedWeights(converted, fmt, path, normalization, statistics)


def unrecognised(path: Path, state: StateDict, expected: StateDict) -> CheckpointError:
    """The error for a file that fits no format: the closest format's differences."""

    def closeness(fmt: WeightsFormat) -> int:
        converted, _ = convert(state, fmt)
        return len(converted.keys() & expected.keys()) + sum(m in state for m in fmt.markers)

    closest = max((f for f in FORMATS.values() if f.name != "lightning_ood"), key=closeness)
    converted, unknown = convert(state, closest)
    detail = "; ".join(mismatches(converted, unknown, expected)) or "its keys do not identify it"
    names = ", ".join(FORMATS)
    return CheckpointError(
        f"Weights file {path} ({len(state)} tensors, first key {next(iter(state))!r}) fits none of the known formats "
        f"({names}) for this backbone. Closest: {closest.title}: {detail}. Check model.backbone, or name the format "
        f"with --model.weights_format."
    )


# ------------------------------------------------------------------------------------- this project's checkpoints
STATISTICS_KEY = "ood_statistics"
NORMALIZATION_KEY = "input_normalization"


def check_fits(checkpoint: dict, backbone: str, num_classes: int, ours: dict[str, Tensor]) -> None:
    """Refuse, with one clear message, a checkpoint whose architecture or class count differs from the configured
    ``backbone`` with ``num_classes`` classes, whose weights are ``ours`` (the backbone's state dict, keys
    ``backbone.*``)."""
    saved = checkpoint.get("hyper_parameters", {})
    if "backbone" in saved and saved["backbone"] != backbone:
        raise CheckpointError(
            f"The checkpoint holds a {saved['backbone']!r} backbone but model.backbone is {backbone!r}; set "
            f"--model.backbone {saved['backbone']}."
        )
    if "num_classes" in saved and saved["num_classes"] != num_classes:
        raise CheckpointError(
            f"The checkpoint was trained for {saved['num_classes']} classes but the data has {num_classes} classes; "
            f"evaluate it on the dataset it was trained on."
        )
    theirs = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("backbone.")}
    problems = mismatches(theirs, [], ours)
    if problems:
        raise CheckpointError(
            f"The checkpoint's weights do not fit the configured {backbone!r} backbone with {num_classes} classes: "
            f"{'; '.join(problems)}. Set model.backbone to the checkpoint's architecture, or load published weights "
            f"with --model.weights."
        )


def checkpoint_statistics(checkpoint: dict, num_classes: int, feature_dim: int) -> FeatureStatistics | None:
    """The OOD statistics a checkpoint carries (:class:`~lightning_ood.statistics.FeatureStatistics`), or ``None``;
    refused when they do not fit the network (``num_classes`` x ``feature_dim``)."""
    if STATISTICS_KEY not in checkpoint:
        return None
    stats = FeatureStatistics.from_state_dict(checkpoint[STATISTICS_KEY])
    if (stats.num_classes, stats.feature_dim) != (num_classes, feature_dim):
        raise CheckpointError(
            f"The checkpoint's OOD statistics are for {stats.num_classes} classes x {stats.feature_dim} features, the "
            f"model has {num_classes} x {feature_dim}; the checkpoint is inconsistent."
        )
    return stats
