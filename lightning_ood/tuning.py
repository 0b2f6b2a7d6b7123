"""Hyperparameter selection and sensitivity sweeps, for any scorer, from what its class declares (``search_space`` and
:class:`~lightning_ood.scoring.base.Tuning`), computed on cached features: no pass over the images beyond the first.
Nothing here names a method: the paper's Section V-F procedure for its method (p x lambda against Gaussian noise,
lambda at percentiles of the training activations, the least intrusive setting among equals, applied to the method's
variants) is what ``FMLS`` declares; the paper's Figures 6 and 7 are the sweeps that ``FMLS``, ``LINE`` and ``ReAct``
declare.

Selection rule: on ID validation images (held-out training images with the test transform) against the validation
OOD images (Gaussian noise N(0, 1) per input value, the paper's; or an OOD set such as OpenOOD's TinyImageNet
validation list), the setting with the lowest FPR95; ties go to the higher AUROC, then to the scorer's ``prefer``, then
to the first setting of the grid.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table
from torch import nn

from lightning_ood.engine import cached_engine
from lightning_ood.metrics import ood_metrics
from lightning_ood.scoring.base import Tuning
from lightning_ood.scoring.registry import family, presets
from lightning_ood.statistics import FeatureSet, FeatureStatistics


def score(name: str, stats: FeatureStatistics, head: nn.Linear, data: FeatureSet, **params):
    """Scores of cached features and logits by ``name`` with ``params``, through the evaluation engine fitted on
    ``stats`` and ``head`` (the cached features and the head on one device)."""
    return cached_engine(head, {name: {"scorer": name, **params}}, stats).score_cached(data)[name]


def absolute(tuning: Tuning, key: str, value: Any, stats: FeatureStatistics) -> tuple[str, Any]:
    """``(hyperparameter, value)`` of a grid entry: a key of ``tuning.of_activations`` (a percentile of the training
    activations) becomes the absolute value of the hyperparameter it sets."""
    target = tuning.of_activations.get(key)
    return (target, stats.activation_percentile(value)) if target else (key, value)


# ------------------------------------------------------------------------------------------------ selection
@dataclass(frozen=True)
class Setting:
    """One point of a scorer's grid: as the grid gave it (``shown``), as it was scored (``params``: absolute values),
    and its validation metrics."""

    shown: tuple[tuple[str, Any], ...]
    params: tuple[tuple[str, Any], ...]
    fpr95: float
    auroc: float


def select(
    name: str,
    tuning: Tuning,
    stats: FeatureStatistics,
    head: nn.Linear,
    id_val: FeatureSet,
    ood_val: FeatureSet,
    grid: Mapping[str, Sequence[Any]],
    fixed: Mapping[str, Any] | None = None,
) -> tuple[Setting, list[Setting]]:
    """Score every setting of the Cartesian product of ``grid`` (and the ``fixed`` hyperparameters) on ID validation vs
    validation OOD features; the choice by the selection rule (module docstring) and every setting."""
    keys = list(grid)
    settings = []
    for values in itertools.product(*(grid[k] for k in keys)):
        shown = tuple(zip(keys, values, strict=True))
        params = tuple(absolute(tuning, k, v, stats) for k, v in shown)
        everything = {**(fixed or {}), **dict(params)}
        m = ood_metrics(score(name, stats, head, id_val, **everything), score(name, stats, head, ood_val, **everything))
        settings.append(Setting(shown, params, m["fpr95"], m["auroc"]))

    return ranked(settings, tuning)[0], settings


def ranked(settings: Sequence[Setting], tuning: Tuning) -> list[Setting]:
    """``settings`` best first, by the selection rule: the lowest FPR95, the highest AUROC, ``tuning.prefer``, grid
    order."""

    def rule(position: int) -> tuple:
        setting = settings[position]
        params = dict(setting.params)
        preferred = [-params[k] if way == "high" else params[k] for k, way in tuning.prefer if k in params]
        return (setting.fpr95, -setting.auroc, *preferred, position)

    return [settings[i] for i in sorted(range(len(settings)), key=rule)]


def tuned_scorers(
    specs: Mapping[str, tuple[str, dict]], name: str, params: Mapping[str, Any], tuning: Tuning
) -> dict[str, dict]:
    """The model's scorer mapping with the chosen ``params``: applied to ``name`` (added under its name when the
    config has none) or, for a ``family`` tuning, to every configured scorer of its class (a variant that fixes a
    tuned hyperparameter to ``None``, ``fm_ls``'s ``clip``, keeps it; a hyperparameter set by a percentile of the
    activations replaces that percentile)."""
    kind = family(name)
    replaced = {target: key for key, target in tuning.of_activations.items()}
    out, found = {}, False
    for label, (scorer, configured) in specs.items():
        configured = dict(configured)
        if scorer == name or (tuning.family and kind is not None and family(scorer) is kind):
            found = True
            for key, value in params.items():
                if key in presets(scorer) and presets(scorer)[key] is None:
                    continue  # the variant switches it off
                configured.pop(replaced.get(key, ""), None)
                configured[key] = value
        out[label] = {"scorer": scorer, **configured}
    if not found:
        out[name] = {"scorer": name, **params}
    return out


def settings_csv(settings: Sequence[Setting]) -> str:
    """One row per setting: the grid's values, the absolute values of those given as activation percentiles,
    FPR95 and AUROC."""
    shown = [k for k, _ in settings[0].shown]
    extra = [k for k, _ in settings[0].params if k not in shown]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*shown, *extra, "fpr95", "auroc"])
    for s in settings:
        params = dict(s.params)
        writer.writerow([*(v for _, v in s.shown), *(params[k] for k in extra), s.fpr95, s.auroc])
    return buffer.getvalue()


def settings_table(name: str, settings: Sequence[Setting], best: Setting) -> Table:
    """The grid with its validation FPR95 and AUROC in %, the chosen setting highlighted."""
    shown = [k for k, _ in settings[0].shown]
    extra = [k for k, _ in settings[0].params if k not in shown]
    table = Table(title=f"tune: validation FPR95 % (AUROC %) of {name}, ID validation vs validation OOD images")
    for key in [*shown, *extra]:
        table.add_column(key)
    table.add_column("FPR95", justify="right")
    table.add_column("AUROC", justify="right")
    for s in settings:
        params = dict(s.params)
        cells = [*(f"{v:g}" if isinstance(v, float) else str(v) for _, v in s.shown)]
        cells += [f"{params[k]:.6g}" for k in extra] + [f"{100 * s.fpr95:.2f}", f"{100 * s.auroc:.2f}"]
        table.add_row(*(f"[bold green]{c}[/]" if s == best else c for c in cells))
    return table


def describe(setting: Setting) -> str:
    """``p = 60, clip = 1.2 (clip_percentile = 90)``: the absolute values, and the grid's where they differ."""
    shown = dict(setting.shown)
    parts = [f"{k} = {v:.6g}" if isinstance(v, float) else f"{k} = {v}" for k, v in setting.params]
    given = [f"{k} = {v:g}" for k, v in shown.items() if k not in dict(setting.params)]
    return ", ".join(parts) + (f" ({', '.join(given)})" if given else "")


# ------------------------------------------------------------------------------------------------ sweeps
@dataclass(frozen=True)
class SweepPoint:
    sweep: str  # the swept grid key ("clip_percentile", "percentile")
    scorer: str
    value: float  # the hyperparameter's absolute value
    ood: str
    fpr95: float
    auroc: float


def sensitivity_sweeps(
    stats: FeatureStatistics,
    head: nn.Linear,
    id_test: FeatureSet,
    oods: Mapping[str, FeatureSet],
    values: Mapping[str, Sequence[Any]],
    scorers: Mapping[str, tuple[Tuning, dict[str, Any]]],
) -> list[SweepPoint]:
    """FPR95/AUROC per OOD set of each of ``scorers`` (``{name: (tuning, configured hyperparameters)}``) over each key
    of ``values``: a scorer whose tuning declares that sweep is scored at every value (its other hyperparameters as
    configured), the others once, as a flat reference line (as LINE in the paper's Figure 7). A key that some
    scorer's tuning maps from activation percentiles to a hyperparameter is drawn at the absolute values."""
    of_activations = {k: t for tuning, _ in scorers.values() for k, t in tuning.of_activations.items()}
    points: list[SweepPoint] = []
    for key, grid in values.items():
        at = [absolute(Tuning(of_activations=of_activations), key, v, stats)[1] for v in grid]  # the x values
        for name, (tuning, configured) in scorers.items():
            swept = tuning.sweeps(key)
            target = tuning.of_activations.get(key, key)
            for value in at if swept else at[:1]:
                params = dict(configured)
                if swept:
                    params.pop(key if key != target else "", None)  # the percentile the absolute value replaces
                    params[target] = value
                engine = cached_engine(head, {name: {"scorer": name, **params}}, stats)
                id_scores = engine.score_cached(id_test)[name]
                for ood, data in oods.items():
                    m = ood_metrics(id_scores, engine.score_cached(data)[name])
                    xs = [value] if swept else at  # a reference: the same at every value
                    points += [SweepPoint(key, name, float(x), ood, m["fpr95"], m["auroc"]) for x in xs]
    return points


def with_average(points: list[SweepPoint]) -> list[SweepPoint]:
    """Append, per (sweep, scorer, value), the average over the OOD sets."""
    groups: dict[tuple, list[SweepPoint]] = {}
    for p in points:
        groups.setdefault((p.sweep, p.scorer, p.value), []).append(p)
    averages = [
        SweepPoint(s, scorer, v, "Average", sum(p.fpr95 for p in g) / len(g), sum(p.auroc for p in g) / len(g))
        for (s, scorer, v), g in groups.items()
    ]
    return points + averages


def to_csv(rows: list) -> str:
    buffer = io.StringIO()
    dicts = [asdict(r) for r in rows]
    writer = csv.DictWriter(buffer, fieldnames=list(dicts[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(dicts)
    return buffer.getvalue()


def sweep_figure(points: list[SweepPoint], sweep: str, xlabel: str, title: str = "", configured: float | None = None):
    """Rows = OOD sets and their average, columns = FPR95 and AUROC in %, one line per scorer (the first, the swept
    one, solid); ``configured`` (the config's value) and the value with the best average FPR95 of the first scorer
    (in hindsight, on these OOD sets) are marked."""
    points = [p for p in points if p.sweep == sweep]
    scorers = list(dict.fromkeys(p.scorer for p in points))
    average = [p for p in points if scorers and p.scorer == scorers[0] and p.ood == "Average"]
    best = min(average, key=lambda p: (p.fpr95, -p.auroc)).value if average else None
    oods = list(dict.fromkeys(p.ood for p in points))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(len(oods), 2, figsize=(8, 2.4 * len(oods)), squeeze=False, dpi=100)
    for row, ood in enumerate(oods):
        for col, metric in enumerate(("fpr95", "auroc")):
            axis = axes[row][col]
            for i, scorer in enumerate(scorers):
                series = sorted(
                    (p.value, 100 * getattr(p, metric)) for p in points if p.ood == ood and p.scorer == scorer
                )
                style = ("-", "--", ":", "-.")[min(i, 3)]
                axis.plot(*zip(*series, strict=True), style, marker="o", markersize=3, color=colours[i % len(colours)],
                          label=scorer)  # fmt: skip
            if configured is not None:
                axis.axvline(
                    configured, color="black", linestyle="--", linewidth=1, label=f"configured {configured:.3g}"
                )
            if best is not None:
                axis.axvline(best, color=colours[0], linestyle=":", linewidth=1, label=f"best average {best:.3g}")
            what = "FPR95 % (lower is better)" if metric == "fpr95" else "AUROC % (higher is better)"
            axis.set_title(f"{ood}: {what}", fontsize=9)
            axis.set_ylabel("%", fontsize=8)
            axis.set_xlabel(xlabel, fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
