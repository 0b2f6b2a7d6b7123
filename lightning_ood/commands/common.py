"""What the OOD commands share: loading the weights to evaluate, the statistics, the feature cache, argument checks,
and the run folder they write into. The commands run in one process, outside Lightning's loops."""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood import fitting
from lightning_ood.checkpoints import read_checkpoint
from lightning_ood.data.base import OODDataModule, attach_normalization
from lightning_ood.errors import ConfigError
from lightning_ood.features import FeatureCache, FeatureSet
from lightning_ood.io import atomic_write_text, check_writable_folder
from lightning_ood.module import OODClassifier
from lightning_ood.scoring.base import Tuning
from lightning_ood.statistics import QUANTILE_STEP, FeatureStatistics


def load_weights(model: OODClassifier, ckpt_path: str | None) -> None:
    """Load a checkpoint's weights and statistics into ``model`` (clear errors for a missing or foreign file)."""
    if ckpt_path is None:
        raise ConfigError(
            "This command evaluates a trained model: pass --ckpt_path <checkpoint> or --model.weights <published "
            "weights>."
        )
    checkpoint = read_checkpoint(ckpt_path)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])


def load_model(trainer: Trainer, model: OODClassifier, datamodule: OODDataModule, ckpt_path: str | None):
    """The model on the trainer's device in eval mode with its weights (a checkpoint, or published weights), and the
    DataModule normalising with the model's normalisation; returns the device."""
    if trainer.world_size > 1:
        raise ConfigError("tune, sweep and import run in one process: use --trainer.devices 1.")
    device = trainer.strategy.root_device
    if ckpt_path is not None or model.hparams.weights is None:  # published weights need no checkpoint
        load_weights(model, ckpt_path)
    model.to(device).eval()
    datamodule.trainer = None
    attach_normalization(model, datamodule)
    datamodule.prepare_data()
    return device


def load_with_statistics(
    trainer: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    ckpt_path: str | None,
    cache: FeatureCache,
    extra_needs: frozenset = frozenset(),
) -> torch.device:
    """:func:`load_model`, the test sets built, and the OOD statistics (computed once, then kept in the cache)."""
    device = load_model(trainer, model, datamodule, ckpt_path)
    datamodule.setup("test")
    ensure_statistics(model, datamodule, str(cache.folder), extra_needs)
    return device


def ensure_statistics(
    model: OODClassifier, datamodule: OODDataModule, cache_dir: str | None = None, extra_needs: frozenset = frozenset()
) -> None:
    """The model's OOD statistics for its weights, the data's training images and what its scorers (and
    ``extra_needs``) read: the loaded ones, or computed now (:func:`lightning_ood.fitting.ensure_statistics`)."""
    inputs = model.fit_inputs(extra_needs, cache_dir)
    model.ood_statistics = fitting.ensure_statistics(model.ood_statistics, inputs, datamodule, None,
                                                     model.checkpoint_loaded)  # fmt: skip


def run_folder(trainer: Trainer) -> Path:
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


TEST_CONFIG = "test_config.yaml"


def follow_up_command(trainer: Trainer, folder: Path, overlay: Path | None = None, fallback: Sequence[str] = ()) -> str:
    """The ``lightning-ood test`` command that evaluates what a command produced, runnable as printed: the CLI hands
    over the run's configuration as ``test`` reads it (``trainer.test_config``: the model with its weights, the
    data, the trainer, the checkpoint), written here to ``folder/test_config.yaml``; then ``-c overlay``. Called
    from Python (no configuration): a ``-c <config>`` to fill in and the ``fallback`` arguments (the weights)."""
    config = getattr(trainer, "test_config", None)
    extra = ["-c", str(overlay)] if overlay is not None else []
    if config is None:
        return " ".join(["lightning-ood test -c <config>", *map(shlex.quote, [*extra, *fallback])])
    path = atomic_write_text(folder / TEST_CONFIG, config)
    return shlex.join(["lightning-ood", "test", "-c", str(path), *extra])


def weights_arguments(model: OODClassifier, ckpt_path: str | None) -> list[str]:
    """The arguments that name the weights a command evaluated: ``--ckpt_path`` or ``--model.weights``."""
    if ckpt_path:
        return ["--ckpt_path", str(ckpt_path)]
    return ["--model.weights", str(model.hparams.weights)] if model.hparams.weights else []


def tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def cached_features(cache: FeatureCache, model, name, dataset, device, weights: str, batch_size: int) -> FeatureSet:
    features, hit = cache.get(name, model.backbone, dataset, weights=weights, device=device, batch_size=batch_size)
    rank_zero_info(f"{name}: {len(features)} images, features {'from the cache' if hit else 'extracted'}.")
    return features


def check_grid(
    name: str, values: list[float] | None, low: float = 0.0, high: float | None = 100.0, step: float | None = None
) -> None:
    """A hyperparameter grid of a command: ``None`` (unset) or a non-empty list of numbers in ``[low, high]``, each
    a multiple of ``step`` when given (percentiles of the training activations, stored on a grid)."""
    if values is None:
        return
    if not values:
        raise ConfigError(f"--{name} is empty: give at least one value.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"--{name}: {value!r} is not a number.")
        if value < low or (high is not None and value > high):
            bounds = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ConfigError(f"--{name}: {value:g} is outside {bounds}.")
        if step is not None and abs(value / step - round(value / step)) > 1e-6:
            raise ConfigError(f"--{name}: {value:g} is not a multiple of {step:g} (the grid the percentiles of the "
                              f"training activations are stored on).")  # fmt: skip


def check_output_file(output: str | None) -> None:
    """An ``--output`` file: not a folder, in a writable folder (checked before any work)."""
    if output is None:
        return
    target = Path(output).expanduser()
    if target.is_dir() or str(output).endswith(("/", "\\")):
        raise ConfigError(f"--output {output} is a folder; give the file to write (for example {target / 'x.yaml'}).")
    check_writable_folder(target.parent, "--output")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def same_value(a: Any, b: Any) -> bool:
    """Whether two grid values are one setting: numbers by value (90 and 90.0), anything else by type and equality
    (``True`` is not ``1``)."""
    if is_number(a) and is_number(b):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def unique_values(values: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``values`` without repeats (first occurrences, in order) and the distinct values that were repeated."""
    kept: list[Any] = []
    repeated: list[Any] = []
    for value in values:
        if not any(same_value(value, k) for k in kept):
            kept.append(value)
        elif not any(same_value(value, r) for r in repeated):
            repeated.append(value)
    return kept, repeated


def show_value(value: Any) -> str:
    return f"{value:g}" if is_number(value) else str(value)


def without_repeats(name: str, values: list[Any], others: int = 1, noun: str | None = None) -> list[Any]:
    """``values`` of the grid argument ``--name`` without repeated values, so that each setting is evaluated once;
    when some were dropped, one console line says which and the size of the grid now and before: ``others`` settings
    per value (the other arguments of a product grid), ``"grid of 4, not 6"``, or with ``noun``, ``"2 percentiles,
    not 3"``."""
    kept, repeated = unique_values(values)
    if repeated:
        plural = "s" if len(repeated) > 1 else ""
        size = grid_size(len(kept) * others, len(values) * others, noun)
        rank_zero_info(f"--{name}: dropped repeated value{plural} {', '.join(map(show_value, repeated))} ({size}).")
    return kept


def distinct_values(
    name: str,
    values: list[float],
    value_of: Callable[[float], float],
    target: str,
    others: int = 1,
    noun: str | None = None,
) -> list[float]:
    """The ``--name`` percentiles of the training activations whose ``target`` values differ: a percentile that gives
    the value of an earlier one (many activations are exactly 0 after a ReLU) is dropped, with one console line,
    since it would evaluate the same setting again (sizes as in :func:`without_repeats`)."""
    kept: list[float] = []
    first: dict[float, float] = {}  # value -> the first percentile that gave it
    dropped = []
    for q in values:
        value = value_of(q)
        if value in first:
            dropped.append(f"{q:g} ({target} {value:.6g}, already given by {first[value]:g})")
        else:
            first[value] = q
            kept.append(q)
    if dropped:
        size = grid_size(len(kept) * others, len(values) * others, noun)
        rank_zero_info(f"--{name}: dropped {', '.join(dropped)}; {size}.")
    return kept


def check_grid_values(
    argument: str, grid: Mapping[str, Sequence[Any]], tuning: Tuning, check: Callable[[str, Any], None]
) -> None:
    """``--argument``'s grid before any work: each key a non-empty list, activation percentiles (the keys of
    ``tuning.of_activations``) in [0, 100] on the 0.1 grid they are stored on, any other value accepted by
    ``check(key, value)`` (which builds the scorer with it)."""
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError(f"--{argument} needs a mapping of hyperparameters to lists of values, got {grid!r}.")
    for key, values in grid.items():
        name = f"{argument}: {key}"
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(f"--{name} needs a non-empty list of values, got {values!r}.")
        if key in tuning.of_activations:
            check_grid(name, list(values), step=QUANTILE_STEP)
        else:
            for value in values:
                check(key, value)


def clean_grid(
    argument: str,
    grid: Mapping[str, Sequence[Any]],
    tuning: Tuning,
    check: Callable[[str, Any], None],
    stats: FeatureStatistics,
    product: bool = True,
) -> dict[str, list[Any]]:
    """``--argument``'s grid, checked (:func:`check_grid_values`), each value once, and no two activation percentiles
    of one value (one console line for what is dropped). ``product``: the settings are the Cartesian product (sizes
    say "grid of N"), else each key's values are swept alone ("N values")."""
    check_grid_values(argument, grid, tuning, check)
    sizes = {key: len(values) for key, values in grid.items()}
    out = {}
    for key, values in grid.items():
        name = f"{argument}: {key}"
        target = tuning.of_activations.get(key)
        others = math.prod(n for k, n in sizes.items() if k != key) if product else 1
        noun = None if product else "values"
        kept = without_repeats(name, list(values), others, noun)
        if target is not None:
            kept = distinct_values(name, kept, stats.activation_percentile, target, others, noun)
        out[key] = kept
        sizes[key] = len(kept)
    return out


def grid_size(now: int, before: int, noun: str | None = None) -> str:
    return f"grid of {now}, not {before}" if noun is None else f"{now} {noun}, not {before}"
