"""``lightning-ood tune``: choose a scorer's hyperparameters on ID validation images against validation OOD images and
write them as a config overlay that ``test -c`` picks up.

The paper's procedure (Section V-F) is the default: ``fmls`` over p and lambda against Gaussian noise N(0, 1). Any
scorer with a declared search space (``Scorer.search_space``, its authors' grid) is tuned the same way with
``--scorer``, on noise or on an OOD validation set (``--validation '{name: tin, image_list: .../cifar10_val_tin.txt}'``,
OpenOOD's). Features are extracted once into the cache; the grid runs on cached tensors in seconds.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.commands.common import (
    cached_features,
    check_grid,
    check_output_file,
    distinct_lambdas,
    follow_up_command,
    load_model,
    run_folder,
    weights_arguments,
    without_repeats,
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
from lightning_ood.statistics import QUANTILE_STEP
from lightning_ood.tuning import DEFAULT_CLIP_PERCENTILES, DEFAULT_PERCENTILES, SELECTIONS

VAL_SIZE = 2000  # ID validation images tune holds out by default (fewer on small datasets: a fifth of them)


def tune(
    self: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    ckpt_path: str | None = None,
    scorer: str = "fmls",
    grid: dict[str, list[Any]] | None = None,
    percentiles: list[float] = list(DEFAULT_PERCENTILES),  # noqa: B006  (jsonargparse reads the default)
    clips: list[float] | None = None,
    clip_percentiles: list[float] = list(DEFAULT_CLIP_PERCENTILES),  # noqa: B006
    validation: str | dict[str, Any] = "noise",
    val_size: int | None = None,
    noise_size: int = 2000,
    seed: int = 0,
    cache_dir: str = "cache/features",
    output: str | None = None,
) -> dict:
    """Select a scorer's hyperparameters on ID validation images vs validation OOD images.

    Args:
        model: the model (from the config).
        datamodule: the data (from the config); its training images provide the ID validation images.
        ckpt_path: the checkpoint to tune (or the config's ``model.weights``).
        scorer: the registered scorer to tune, by the selection its class declares (``Scorer.selection``): ``fmls``
            (the paper's procedure: p and lambda) or any scorer with a search space
            that scores features (``knn``, ``vim``, ``gen``, ``react``, ``dice``, ``nnguide``, ...).
        grid: the grid of a scorer selected by grid, ``{hyperparameter: [values]}``; default its authors' grid.
        percentiles: the paper's procedure: masking percentiles p to try (10, 20, ..., 90). In every grid argument
            a repeated value is evaluated once (with a console line saying so).
        clips: the paper's procedure: absolute lambdas to try; when unset, lambda runs over ``clip_percentiles``.
        clip_percentiles: the paper's procedure: lambdas as percentiles of the training activations.
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
        ``{"scorer": name, "params": {...}, "fpr95": ..., "auroc": ..., "overlay": path}``.
    """
    tuned = check_tunable(scorer, grid, model)
    check_grid("percentiles", percentiles)
    check_grid("clips", clips, high=None)
    check_grid("clip_percentiles", clip_percentiles, step=QUANTILE_STEP)
    check_output_file(output)
    for name, value in (("val_size", val_size), ("noise_size", noise_size)):
        if value is not None and value < 1:
            raise ConfigError(f"tune --{name} must be >= 1, got {value}.")
    check_seed("tune --seed", seed)
    if validation != "noise":
        check_ood_entry(validation, "tune --validation")
    cache = FeatureCache(cache_dir)
    cache.check("tune --cache_dir")
    selection = type(tuned).selection
    if selection == "paper":  # each setting once: the percentiles, and the lambdas the command runs over
        lambdas = clips if clips is not None else clip_percentiles
        percentiles = without_repeats("percentiles", percentiles, len(lambdas))
        if clips is not None:
            clips = without_repeats("clips", clips, len(percentiles))
        else:
            clip_percentiles = without_repeats("clip_percentiles", clip_percentiles, len(percentiles))
    elif grid:
        grid = unique_grid(grid)
    device = load_model(self, model, datamodule, ckpt_path)
    datamodule.setup("test")
    chosen = ""
    if not datamodule.val_split:  # hold the validation images out of the statistics (not of a published training)
        datamodule.val_split, chosen = held_out_size(datamodule, val_size)
        datamodule.val_seed = seed
    model.ensure_statistics(datamodule, None, str(cache.folder), type(tuned).needs_statistics)
    rank_zero_info(
        f"ID validation: {datamodule.val_split} training images held out (seed {datamodule.val_seed}{chosen}); OOD "
        f"statistics on the rest: {datamodule.describe_statistics_images()}."
    )
    weights = weights_fingerprint(model.backbone)
    batch = datamodule.eval_batch_size
    id_val = cached_features(cache, model, f"{datamodule.id_name}_val", datamodule.validation_set(), device, weights,
                             batch)  # fmt: skip
    ood_name, ood_set = validation_set(validation, datamodule, noise_size, seed)
    ood_val = cached_features(cache, model, f"{ood_name}_val", ood_set, device, weights, batch)
    head = copy.deepcopy(model.backbone.head).cpu()  # cached features live on the CPU
    stats = model.ood_statistics.to("cpu")
    if selection == "paper" and clips is None:
        clip_percentiles = distinct_lambdas("clip_percentiles", clip_percentiles, stats.activation_percentile,
                                            len(percentiles))  # fmt: skip
    start = time.perf_counter()
    result = SELECTIONS[selection].run(
        scorer, stats, head, id_val, ood_val, model.scorer_specs, grid=grid, percentiles=percentiles, clips=clips,
        clip_percentiles=clip_percentiles,
    )  # fmt: skip
    results_console().print(result.table)
    elapsed = time.perf_counter() - start
    folder = run_folder(self)
    atomic_write_text(folder / "tune_grid.csv", result.csv)  # the grid first: an overlay never stands alone
    text = (
        f"# Selected by `lightning-ood tune --scorer {scorer}` on {len(id_val)} ID validation images vs "
        f"{len(ood_val)} {ood_name} images:\n# {result.summary}; validation FPR95 {100 * result.fpr95:.2f}%, "
        f"AUROC {100 * result.auroc:.2f}%.\n" + yaml.safe_dump({"model": {"scorers": result.scorers}}, sort_keys=False)
    )
    paths = [atomic_write_text(folder / "selected.yaml", text)]
    if output:
        paths.append(atomic_write_text(output, text))
    command = follow_up_command(self, folder, paths[-1], weights_arguments(model, ckpt_path))
    rank_zero_info(
        f"Selected {result.summary} (grid of {result.size} in {elapsed:.2f}s). Overlay: "
        f"{', '.join(map(str, paths))}; grid: {folder / 'tune_grid.csv'}. Test with: {command}"
    )
    return {"scorer": scorer, "params": result.params, "fpr95": result.fpr95, "auroc": result.auroc,
            "overlay": str(paths[-1])}  # fmt: skip


def check_tunable(name: str, grid: dict | None, model: OODClassifier):
    """The scorer to tune, built and bound; refused when it cannot be scored from cached features or has no grid."""
    if name not in SCORERS:
        raise ConfigError(f"Unknown scorer {name!r} for tune. Choose one of: {', '.join(sorted(SCORERS))}.")
    scorer = build_scorer(name).bind(model.backbone)
    if scorer.needs_inputs or scorer.needs_blocks or scorer.references:
        raise ConfigError(
            f"tune works on cached penultimate features, and {name!r} reads the input images, block outputs or "
            f"reference images; choose its hyperparameters with a sweep of `test` runs instead."
        )
    SELECTIONS[type(scorer).selection].check(name, type(scorer), grid)
    return scorer


def unique_grid(grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``--grid`` with each hyperparameter's repeated values dropped (one console line per hyperparameter)."""
    sizes = {key: len(values) for key, values in grid.items()}
    out = {}
    for key, values in grid.items():
        others = math.prod(n for k, n in sizes.items() if k != key)
        out[key] = without_repeats(f"grid: {key}", list(values), others)
        sizes[key] = len(out[key])
    return out


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
