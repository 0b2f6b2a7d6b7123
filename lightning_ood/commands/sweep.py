"""``lightning-ood sweep``: the sensitivity of scorers to their hyperparameters on every OOD set, on cached features (a
finer grid costs seconds), from the sweeps their classes declare (:class:`~lightning_ood.scoring.base.Tuning`): by
default the paper's Figures 6 and 7, ``fmls`` over lambda and over p with LINE and ReAct beside it."""

from __future__ import annotations

import copy
import time
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood import fitting
from lightning_ood.commands.common import (
    cached_features,
    check_grid_values,
    clean_grid,
    load_with_statistics,
    run_folder,
    tensorboard,
)
from lightning_ood.data.base import OODDataModule
from lightning_ood.errors import ConfigError
from lightning_ood.features import FeatureCache, weights_fingerprint
from lightning_ood.io import atomic_write_text
from lightning_ood.module import OODClassifier
from lightning_ood.scoring import SCORERS, build_scorer
from lightning_ood.scoring.base import Tuning
from lightning_ood.tuning import sensitivity_sweeps, sweep_figure, to_csv, with_average


def sweep(
    self: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    ckpt_path: str | None = None,
    scorers: list[str] | None = None,
    values: dict[str, list[Any]] | None = None,
    cache_dir: str = "cache/features",
) -> dict:
    """FPR95 and AUROC of scorers over their hyperparameters on every OOD set of the test loaders, one figure per
    swept hyperparameter (a CSV of every point).

    Args:
        model: the model (from the config); its scorers' hyperparameters are the fixed ones.
        datamodule: the data (from the config); its test sets are swept.
        ckpt_path: the checkpoint.
        scorers: registered scorers to draw; default the configured ones that declare a sweep, without presets
            (``fmls``, ``line``, ``react`` in the paper's configs), the one declaring the most sweeps first. Each
            is drawn at its configured hyperparameters (its registry defaults when the config has none).
        values: ``{key: [values]}`` to sweep, default the sweeps the scorers declare (``fmls``: ``clip_percentile``,
            lambda at percentiles of the training activations, and ``percentile``, p); a scorer that does not declare
            a key is drawn once, as a flat reference line. A repeated value, or a percentile that gives an earlier
            one's lambda, is evaluated once (with a console line).
        cache_dir: feature cache folder.

    Returns:
        ``{"csv": path, "figures": [paths], "seconds": time of the sweep on cached features}``.
    """
    names = list(scorers) if scorers is not None else default_scorers(model)
    for name in names:
        if name not in SCORERS:
            raise ConfigError(f"Unknown scorer {name!r} for sweep. Choose one of: {', '.join(sorted(SCORERS))}.")
    if not names:
        raise ConfigError("sweep: no scorer to draw: name some with --scorers (e.g. [fmls, line, react]).")
    cache = FeatureCache(cache_dir)
    cache.check("sweep --cache_dir")
    specs = {name: next((p for n, p in model.scorer_specs.values() if n == name), {}) for name in names}
    built = {name: build_scorer(name, **params) for name, params in specs.items()}
    tunings = {name: type(scorer).tuning for name, scorer in built.items()}
    declared: dict[str, tuple] = {}
    for tuning in tunings.values():
        for key, grid in tuning.sweep.items():
            declared.setdefault(key, grid)
    wanted = dict(values) if values is not None else dict(declared)
    unknown = [key for key in wanted if not any(tuning.sweeps(key) for tuning in tunings.values())]
    if unknown:
        raise ConfigError(
            f"sweep --values: no scorer of {names} declares a sweep over {', '.join(unknown)} (they do over "
            f"{', '.join(declared) or 'nothing'})."
        )
    first = next((name for name in names if tunings[name].sweep), names[0])
    merged = Tuning(of_activations={k: t for tuning in tunings.values() for k, t in tuning.of_activations.items()})

    def check(key: str, value: Any) -> None:  # the value must make a scorer of the first that sweeps it
        owner = next(name for name in names if tunings[name].sweeps(key))
        build_scorer(owner, **{**specs[owner], key: value})

    check_grid_values("values", wanted, merged, check)
    device = load_with_statistics(self, model, datamodule, ckpt_path, cache)
    if len(datamodule.test_sets) < 2:
        raise ConfigError("sweep needs OOD sets: set data.init_args.ood.")
    references = set().union(*(scorer.needs.references for scorer in built.values()))
    fitting.ensure_references(model.ood_statistics, model.fit_inputs(), references, datamodule)
    stats = model.ood_statistics.to("cpu")  # the cached features are on the CPU
    wanted = clean_grid("values", wanted, merged, check, stats, product=False)
    weights = weights_fingerprint(model.backbone)
    batch = datamodule.eval_batch_size
    sets = {name: cached_features(cache, model, name, dataset, device, weights, batch)
            for name, dataset in datamodule.test_sets.items()}  # fmt: skip
    id_name = datamodule.id_name
    oods = {name: data for name, data in sets.items() if name != id_name}
    start = time.perf_counter()
    swept = {name: (tunings[name], specs[name]) for name in names}
    points = with_average(sensitivity_sweeps(stats, copy.deepcopy(model.backbone.head).cpu(), sets[id_name], oods,
                                             wanted, swept))  # fmt: skip
    elapsed = time.perf_counter() - start

    folder = run_folder(self)
    csv_path = atomic_write_text(folder / "sensitivity.csv", to_csv(points))
    figures = []
    board = tensorboard(self)
    for key in wanted:
        target = merged.of_activations.get(key, key)
        owner = next((name for name in names if tunings[name].sweeps(key)), first)
        configured = specs[owner].get(target, getattr(built[owner], target, None))
        title = f"{id_name} / {model.hparams.backbone}: sensitivity to {target} of {', '.join(names)}"
        label = f"{target}" + (" (at percentiles of the training activations)" if target != key else "")
        figure = sweep_figure(points, key, label, title, configured if isinstance(configured, int | float) else None)
        path = folder / f"sensitivity_{target}.png"
        figure.savefig(path)
        figures.append(path)
        if board is not None:
            board.experiment.add_figure(f"sensitivity/{target}", figure, close=True)
    if board is not None:
        board.experiment.flush()
    rank_zero_info(
        f"Sweep of {', '.join(f'{len(v)} {k}' for k, v in wanted.items())} over {len(oods)} OOD sets on cached "
        f"features took {elapsed:.2f}s. Written: {csv_path}, {', '.join(map(str, figures))}."
    )
    return {"csv": str(csv_path), "figures": [str(f) for f in figures], "seconds": elapsed}


def default_scorers(model: OODClassifier) -> list[str]:
    """The configured scorers whose class declares a sweep and whose registration sets no presets (the method itself,
    not a variant), those declaring the most sweeps first."""
    found = []
    for name, _ in model.scorer_specs.values():
        entry = SCORERS.get(name)
        tuning: Tuning | None = getattr(entry.build, "tuning", None) if entry is not None else None
        if tuning is not None and tuning.sweep and not entry.presets and isinstance(entry.build, type):
            found.append(name)
    names = list(dict.fromkeys(found))
    return sorted(names, key=lambda n: -len(SCORERS[n].build.tuning.sweep))
