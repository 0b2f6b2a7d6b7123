"""``lightning-ood sweep``: sensitivity of the paper's method (and LINE / ReAct) to lambda and to p on every OOD set
(Figures 6 and 7), on cached features: a finer grid costs seconds."""

from __future__ import annotations

import copy
import time

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.commands.common import (
    cached_features,
    check_grid,
    distinct_lambdas,
    load_with_statistics,
    run_folder,
    tensorboard,
    without_repeats,
)
from lightning_ood.data.base import OODDataModule
from lightning_ood.errors import ConfigError
from lightning_ood.features import FeatureCache, weights_fingerprint
from lightning_ood.io import atomic_write_text
from lightning_ood.module import OODClassifier
from lightning_ood.statistics import QUANTILE_STEP
from lightning_ood.tuning import sensitivity_sweeps, sweep_figure, to_csv, with_average

SWEEP_LAMBDA_PERCENTILES = (5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0, 97.5, 99.0, 99.9)
SWEEP_PERCENTILES = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)


def sweep(
    self: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    ckpt_path: str | None = None,
    lambdas: list[float] | None = None,
    lambda_percentiles: list[float] = list(SWEEP_LAMBDA_PERCENTILES),  # noqa: B006
    percentiles: list[float] = list(SWEEP_PERCENTILES),  # noqa: B006
    cache_dir: str = "cache/features",
) -> dict:
    """Sensitivity of ``fmls`` (and LINE / ReAct) to lambda and to p on every OOD set of the test loaders.

    Args:
        model: the model (from the config); its ``fmls`` and ``line`` hyperparameters are the fixed ones.
        datamodule: the data (from the config); its test sets are swept.
        ckpt_path: the checkpoint.
        lambdas: absolute lambdas; when unset, lambda runs over ``lambda_percentiles`` of the training activations.
        lambda_percentiles: lambdas as percentiles of the training activations (a percentile that gives the
            lambda of an earlier one is dropped, with a console line).
        percentiles: masking percentiles p. In every list a repeated value is evaluated once (with a console line
            saying so), so the CSV has no repeated rows.
        cache_dir: feature cache folder.

    Returns:
        ``{"csv": path, "figures": [paths], "seconds": time of the sweep on cached features}``.
    """
    check_grid("lambdas", lambdas, high=None)
    check_grid("lambda_percentiles", lambda_percentiles, step=QUANTILE_STEP)
    check_grid("percentiles", percentiles)
    cache = FeatureCache(cache_dir)
    cache.check("sweep --cache_dir")
    if lambdas is not None:
        lambdas = without_repeats("lambdas", lambdas, noun="lambdas")
    else:
        lambda_percentiles = without_repeats("lambda_percentiles", lambda_percentiles, noun="lambdas")
    percentiles = without_repeats("percentiles", percentiles, noun="percentiles")
    device = load_with_statistics(self, model, datamodule, ckpt_path, cache)
    if len(datamodule.test_sets) < 2:
        raise ConfigError("sweep needs OOD sets: set data.init_args.ood.")
    stats = model.ood_statistics.to("cpu")  # the cached features are on the CPU
    weights = weights_fingerprint(model.backbone)
    batch = datamodule.eval_batch_size
    sets = {name: cached_features(cache, model, name, dataset, device, weights, batch)
            for name, dataset in datamodule.test_sets.items()}  # fmt: skip
    id_name = datamodule.id_name
    oods = {name: data for name, data in sets.items() if name != id_name}
    specs = {name: params for name, params in model.scorer_specs.values()}
    fmls = specs.get("fmls", {})
    if lambdas is None:
        lambda_percentiles = distinct_lambdas("lambda_percentiles", lambda_percentiles, stats.activation_percentile,
                                              noun="lambdas")  # fmt: skip
    grid = lambdas or [stats.activation_percentile(q) for q in lambda_percentiles]
    start = time.perf_counter()
    points = with_average(sensitivity_sweeps(
        stats, copy.deepcopy(model.backbone.head).cpu(), sets[id_name], oods, grid, percentiles,
        percentile=fmls.get("percentile", 60.0), clip=fmls.get("clip", 1.0), line_params=specs.get("line"),
    ))  # fmt: skip
    elapsed = time.perf_counter() - start

    folder = run_folder(self)
    csv_path = atomic_write_text(folder / "sensitivity.csv", to_csv(points))
    figures = []
    board = tensorboard(self)
    title = (
        f"{datamodule.id_name} / {model.hparams.backbone}: sensitivity of fmls (p = {fmls.get('percentile', 60.0):g})"
    )
    marks = {"lambda": fmls.get("clip", 1.0), "percentile": fmls.get("percentile", 60.0)}
    for sweep, label in (("lambda", "lambda (ReAct threshold)"), ("percentile", "masking percentile p (%)")):
        figure = sweep_figure(points, sweep, label, title, marks[sweep])
        path = folder / f"sensitivity_{sweep}.png"
        figure.savefig(path)
        figures.append(path)
        if board is not None:
            board.experiment.add_figure(f"sensitivity/{sweep}", figure, close=True)
    if board is not None:
        board.experiment.flush()
    rank_zero_info(
        f"Sweep of {len(grid)} lambdas and {len(percentiles)} percentiles over {len(oods)} OOD sets on cached "
        f"features took {elapsed:.2f}s. Written: {csv_path}, {', '.join(map(str, figures))}."
    )
    return {"csv": str(csv_path), "figures": [str(f) for f in figures], "seconds": elapsed}
