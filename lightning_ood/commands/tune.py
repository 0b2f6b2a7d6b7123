"""``lightning-ood tune``: choose a scorer's hyperparameters and write them as a config overlay that ``test -c`` picks
up, the way the scorer's class declares (``search_space`` and :class:`~lightning_ood.scoring.base.Tuning`):

- a grid (its authors', or ``--grid``) scored on ID validation images against validation OOD images: Gaussian noise
  N(0, 1) (the paper's Section V-F) or an OOD set (``--validation '{name: tin, image_list: .../cifar10_val_tin.txt}'``,
  OpenOOD's). Features are extracted once into the cache; the grid runs on cached tensors in seconds. ``fmls``
  declares the paper's procedure (p x lambda, lambda at percentiles of the training activations, the least intrusive
  setting among equals, the choice applied to its variants);
- or a setting the scorer chooses itself from the ID training images (FeatureNorm's block, by NormRatio), with what
  it measured (``normratio.csv`` and ``.png``).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood import fitting
from lightning_ood.commands.common import (
    cached_features,
    check_grid_values,
    check_output_file,
    clean_grid,
    ensure_statistics,
    follow_up_command,
    load_model,
    run_folder,
    tensorboard,
    weights_arguments,
)
from lightning_ood.data.base import OODDataModule, check_ood_entry
from lightning_ood.data.ood import build_ood_set, ood_entry
from lightning_ood.data.reproducible import check_seed
from lightning_ood.data.sets import NoiseImages
from lightning_ood.errors import ConfigError
from lightning_ood.features import FeatureCache, weights_fingerprint
from lightning_ood.io import atomic_write_text
from lightning_ood.module import OODClassifier
from lightning_ood.report import results_console
from lightning_ood.scoring import SCORERS, build_scorer
from lightning_ood.scoring.base import Scorer
from lightning_ood.scoring.registry import PAPER_METHOD
from lightning_ood.tuning import describe, select, settings_csv, settings_table, tuned_scorers

VAL_SIZE = 2000  # ID validation images tune holds out by default (fewer on small datasets: a fifth of them)


def tune(
    self: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    ckpt_path: str | None = None,
    scorer: str = PAPER_METHOD,
    grid: dict[str, list[Any]] | None = None,
    settings: dict[str, Any] | None = None,
    validation: str | dict[str, Any] = "noise",
    val_size: int | None = None,
    noise_size: int = 2000,
    seed: int = 0,
    cache_dir: str = "cache/features",
    output: str | None = None,
) -> dict:
    """Choose a scorer's hyperparameters: on ID validation images vs validation OOD images, or, for a scorer that
    chooses a setting itself (FeatureNorm's block), from the ID training images.

    Args:
        model: the model (from the config).
        datamodule: the data (from the config); its training images provide the ID validation images.
        ckpt_path: the checkpoint to tune (or the config's ``model.weights``).
        scorer: the registered scorer to tune (the paper's method, ``fmls``, by default; any scorer that scores
            features and declares a search space: ``knn``, ``vim``, ``gen``, ``react``, ``dice``, ...; or one that
            chooses a setting itself: ``featurenorm``).
        grid: ``{hyperparameter: [values]}``, default the scorer's declared grid (its authors'); keys of
            activation percentiles (``fmls``: ``clip_percentile``) are scored and written as the absolute value
            (``clip``). Every setting of the product is scored once (a repeated value is dropped, with a line).
        settings: hyperparameters of the scorer held fixed (``{normratio_images: 5000}``).
        validation: the validation OOD images: ``noise`` (Gaussian N(0, 1) per input value, the paper's) or an OOD set
            entry as in ``data.ood`` (e.g. ``{name: tin, image_list: cifar10_val_tin.txt}``, OpenOOD's).
        val_size: ID validation images when ``data.val_split`` is 0: that many training images (test transform,
            a permutation seeded by ``seed``) are held out from the OOD statistics, which tune fits again on the
            remaining images. Unset (the default): 2000, or a fifth of the training images when that is fewer
            (at least 1), so that four fifths remain for the statistics; an explicit value must leave at least one
            training image. With ``data.val_split`` set, its held-out images (excluded from training and statistics
            alike) are the ID validation images.
        noise_size: Gaussian-noise images.
        seed: seed of the validation subset (when ``data.val_split`` is 0) and of the noise.
        cache_dir: feature cache folder.
        output: also write the selected overlay here (it is always written to the run's log folder).

    Returns:
        ``{"scorer": name, "params": {...}, "fpr95": ..., "auroc": ..., "overlay": path}`` (no metrics for a setting
        the scorer chose itself).
    """
    tuned = check_tunable(scorer, grid, settings or {}, model)
    tuning = type(tuned).tuning

    def check(key: str, value: Any) -> None:
        build_scorer(scorer, **{**(settings or {}), key: value})

    if not tuning.prepared:
        check_grid_values("grid", grid or dict(type(tuned).search_space), tuning, check)
    check_output_file(output)
    for name, value in (("val_size", val_size), ("noise_size", noise_size)):
        if value is not None and value < 1:
            raise ConfigError(f"tune --{name} must be >= 1, got {value}.")
    check_seed("tune --seed", seed)
    if validation != "noise":
        check_ood_entry(validation, "tune --validation")
    cache = FeatureCache(cache_dir)
    cache.check("tune --cache_dir")
    load_model(self, model, datamodule, ckpt_path)
    if type(tuned).tuning.prepared:
        return prepared(self, model, datamodule, ckpt_path, scorer, tuned, settings or {}, output)
    datamodule.setup("test")
    chosen = ""
    if not datamodule.val_split:  # hold the validation images out of the statistics (not of a published training)
        datamodule.val_split, chosen = held_out_size(datamodule, val_size)
        datamodule.val_seed = seed
    ensure_statistics(model, datamodule, str(cache.folder), type(tuned).needs_statistics)
    rank_zero_info(
        f"ID validation: {datamodule.val_split} training images held out (seed {datamodule.val_seed}{chosen}); OOD "
        f"statistics on the rest: {datamodule.describe_statistics_images()}."
    )
    stats = model.ood_statistics.to("cpu")
    grid = clean_grid("grid", grid or dict(type(tuned).search_space), tuning, check, stats)
    weights = weights_fingerprint(model.backbone)
    device, batch = model.device, datamodule.eval_batch_size
    id_val = cached_features(cache, model, f"{datamodule.id_name}_val", datamodule.validation_set(), device, weights,
                             batch)  # fmt: skip
    ood_name, ood_set = validation_set(validation, datamodule, noise_size, seed)
    ood_val = cached_features(cache, model, f"{ood_name}_val", ood_set, device, weights, batch)
    head = copy.deepcopy(model.backbone.head).cpu()  # cached features live on the CPU
    start = time.perf_counter()
    best, evaluated = select(scorer, tuning, stats, head, id_val, ood_val, grid, settings)
    elapsed = time.perf_counter() - start
    results_console().print(settings_table(scorer, evaluated, best))
    folder = run_folder(self)
    atomic_write_text(
        folder / "tune_grid.csv", settings_csv(evaluated)
    )  # the grid first: an overlay never stands alone
    params = {**(settings or {}), **dict(best.params)}
    summary = describe(best)
    scorers = tuned_scorers(model.scorer_specs, scorer, params, tuning)
    text = (
        f"# Selected by `lightning-ood tune --scorer {scorer}` on {len(id_val)} ID validation images vs "
        f"{len(ood_val)} {ood_name} images:\n# {summary}; validation FPR95 {100 * best.fpr95:.2f}%, "
        f"AUROC {100 * best.auroc:.2f}%.\n" + yaml.safe_dump({"model": {"scorers": scorers}}, sort_keys=False)
    )
    overlay = write_overlay(folder, text, output)
    command = follow_up_command(self, folder, overlay, weights_arguments(model, ckpt_path))
    rank_zero_info(
        f"Selected {summary} (grid of {len(evaluated)} in {elapsed:.2f}s). Overlay: {overlay}; grid: "
        f"{folder / 'tune_grid.csv'}. Test with: {command}"
    )
    return {"scorer": scorer, "params": params, "fpr95": best.fpr95, "auroc": best.auroc, "overlay": str(overlay)}


def prepared(
    self: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    ckpt_path,
    name: str,
    scorer: Scorer,
    settings: dict[str, Any],
    output: str | None,
) -> dict:
    """A setting the scorer chooses itself from the ID training images (``Tuning.prepared``): its ``prepare`` on the
    run's training images, the choice written as an overlay with what it measured (a table, a CSV, a figure)."""
    datamodule.setup("statistics")
    inputs = model.fit_inputs()
    scorer.bind(model.backbone).prepare(fitting.fit_context(inputs, datamodule, None))
    chosen = {key: getattr(scorer, key) for key in type(scorer).tuning.prepared}
    folder = run_folder(self)
    measured = scorer.preparation
    if measured is not None:
        results_console().print(measured.table())
        atomic_write_text(folder / f"{measured.name}.csv", measured.to_csv())
        figure = measured.figure()
        figure.savefig(folder / f"{measured.name}.png")
        board = tensorboard(self)
        if board is not None:
            board.experiment.add_figure(measured.name, figure, close=True)
            board.experiment.flush()
    params = chosen  # what the settings chose: the test needs no more (they were for the choice)
    summary = ", ".join(f"{k} = {v}" for k, v in chosen.items())
    text = f"# Chosen by `lightning-ood tune --scorer {name}` on the ID training images: {summary}.\n" + yaml.safe_dump(
        {"model": {"scorers": tuned_scorers(model.scorer_specs, name, params, type(scorer).tuning)}}, sort_keys=False
    )
    overlay = write_overlay(folder, text, output)
    command = follow_up_command(self, folder, overlay, weights_arguments(model, ckpt_path))
    rank_zero_info(f"Chose {name}: {summary}. Overlay: {overlay}. Test with: {command}")
    return {"scorer": name, "params": params, "overlay": str(overlay)}


def write_overlay(folder, text: str, output: str | None):
    """``selected.yaml`` in the run folder (and ``output``); the path of the last one written."""
    paths = [atomic_write_text(folder / "selected.yaml", text)]
    if output:
        paths.append(atomic_write_text(output, text))
    return paths[-1]


def check_tunable(name: str, grid: dict | None, settings: dict[str, Any], model: OODClassifier) -> Scorer:
    """The scorer to tune, built with the fixed ``settings`` and bound; refused when it can be chosen neither on
    cached features (it reads the input images, block outputs or reference images) nor by itself, or has no grid."""
    if name not in SCORERS:
        raise ConfigError(f"Unknown scorer {name!r} for tune. Choose one of: {', '.join(sorted(SCORERS))}.")
    if not isinstance(settings, dict):
        raise ConfigError(f"tune --settings needs a mapping of hyperparameters to values, got {settings!r}.")
    scorer = build_scorer(name, **settings).bind(model.backbone)
    kind = type(scorer)
    if kind.tuning.prepared:
        if grid:
            raise ConfigError(f"{name!r} chooses {', '.join(kind.tuning.prepared)} itself: it takes no --grid.")
        return scorer
    if scorer.needs_inputs or scorer.needs_blocks or scorer.references:
        raise ConfigError(
            f"tune works on cached penultimate features, and {name!r} reads the input images, block outputs or "
            f"reference images; choose its hyperparameters with a sweep of `test` runs instead."
        )
    if not (grid or kind.search_space):
        raise ConfigError(f"Scorer {name!r} declares no search space: give one with --grid '{{name: [values]}}'.")
    return scorer


def held_out_size(datamodule: OODDataModule, val_size: int | None) -> tuple[int, str]:
    """How many training images tune holds out as ID validation images, and how that count was chosen (for the
    console): ``val_size``, or by default :data:`VAL_SIZE` or a fifth of the training images when that is fewer (at
    least 1). Refused when it would leave no training image for the statistics."""
    if datamodule.statistics_set is None:
        datamodule.setup("statistics")
    n = len(datamodule.statistics_set)
    default = min(VAL_SIZE, max(1, n // 5))
    if n < 2:
        raise ConfigError(
            f"tune holds out training images as ID validation images and fits the OOD statistics on the rest, which "
            f"needs at least 2 training images; the data has {n}."
        )
    if val_size is None:
        how = f"{VAL_SIZE}" if default == VAL_SIZE else f"a fifth of the {n} training images"
        return default, f"; the default --val_size: {how}"
    if val_size >= n:
        raise ConfigError(
            f"Cannot hold out {val_size} of the {n} training images as ID validation images: choose a --val_size "
            f"below {n}, or leave it unset ({default} here)."
        )
    return val_size, ""


def validation_set(validation: str | dict, datamodule: OODDataModule, noise_size: int, seed: int):
    """``(name, dataset)`` of the validation OOD images: the paper's Gaussian noise, or an OOD set of the registry."""
    shape = (3, datamodule.image_size, datamodule.image_size)
    if validation == "noise":
        return "gaussian_noise", NoiseImages(size=noise_size, shape=shape, seed=seed + 1)
    label, name, options = ood_entry(validation)
    dataset = build_ood_set(name, datamodule.ood_transform(), shape, datamodule.ood_root, **options)
    return label, dataset
