"""Hyperparameter selection (the paper's Section V-F, generalised to every scorer with a search space) and
sensitivity sweeps (Figures 6 and 7), computed on cached features: no pass over the images beyond the first.

Selection rule: on ID validation images (held-out training images with the test transform) against the validation
OOD images (Gaussian noise N(0, 1) per input value, the paper's; or an OOD set such as OpenOOD's TinyImageNet
validation list), take the setting with the lowest FPR95; ties go to the higher AUROC. For the paper's ``fmls`` the
next ties go to the least intrusive setting (the largest lambda, then the smallest p), so an easy validation set that
many settings separate perfectly does not push the choice to an extreme; for other scorers to the first setting of the
grid.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.table import Table
from torch import nn

from lightning_ood.engine import cached_engine
from lightning_ood.errors import ConfigError
from lightning_ood.metrics import ood_metrics
from lightning_ood.scoring import Scorer, build_scorer
from lightning_ood.scoring.registry import family, presets
from lightning_ood.statistics import FeatureSet, FeatureStatistics

DEFAULT_PERCENTILES = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)  # the paper's grid for p
DEFAULT_CLIP_PERCENTILES = (50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0, 99.0)  # lambda grid, as activation percentiles


@dataclass(frozen=True)
class Candidate:
    """One point of the selection grid with its validation metrics."""

    percentile: float
    clip: float
    clip_percentile: float | None
    fpr95: float
    auroc: float


def selection_key(candidate: Candidate) -> tuple[float, float, float, float]:
    """The paper's rule as a sort key: lowest FPR95, then highest AUROC, then largest lambda, then smallest p."""
    return (candidate.fpr95, -candidate.auroc, -candidate.clip, candidate.percentile)


def score(name: str, stats: FeatureStatistics, head: nn.Linear, data: FeatureSet, **params):
    """Scores of cached features and logits by ``name`` with ``params``, through the evaluation engine fitted on
    ``stats`` and ``head`` (the cached features and the head on one device)."""
    return cached_engine(head, {name: {"scorer": name, **params}}, stats).score_cached(data)[name]


def select_fmls(
    stats: FeatureStatistics,
    head: nn.Linear,
    id_val: FeatureSet,
    noise: FeatureSet,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    clips: Sequence[float] | None = None,
    clip_percentiles: Sequence[float] = DEFAULT_CLIP_PERCENTILES,
    name: str = "fmls",
) -> tuple[Candidate, list[Candidate]]:
    """Grid search of (p, lambda) for ``fmls`` on ID validation vs noise; returns the choice and the whole grid.

    ``clips`` gives absolute lambdas; otherwise lambda runs over ``clip_percentiles`` of the training activations.
    """
    grid = (
        [(c, None) for c in clips]
        if clips is not None
        else [(stats.activation_percentile(q), q) for q in clip_percentiles]
    )
    candidates = []
    for p in percentiles:
        for clip, q in grid:
            id_scores = score(name, stats, head, id_val, percentile=p, clip=clip)
            noise_scores = score(name, stats, head, noise, percentile=p, clip=clip)
            m = ood_metrics(id_scores, noise_scores)
            candidates.append(Candidate(float(p), float(clip), q, m["fpr95"], m["auroc"]))
    best = min(candidates, key=selection_key)
    return best, candidates


@dataclass(frozen=True)
class Setting:
    """One point of a scorer's grid with its validation metrics."""

    params: tuple[tuple[str, Any], ...]
    fpr95: float
    auroc: float


def select_scorer(
    name: str,
    stats: FeatureStatistics,
    head: nn.Linear,
    id_val: FeatureSet,
    ood_val: FeatureSet,
    grid: dict[str, Sequence[Any]],
) -> tuple[Setting, list[Setting]]:
    """Grid search of any feature-space scorer over the Cartesian product of ``grid``; the lowest FPR95, then the
    highest AUROC, then the first setting in grid order."""
    keys = list(grid)
    settings = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values, strict=True))
        m = ood_metrics(score(name, stats, head, id_val, **params), score(name, stats, head, ood_val, **params))
        settings.append(Setting(tuple(params.items()), m["fpr95"], m["auroc"]))
    best = min(settings, key=lambda s: (s.fpr95, -s.auroc))  # min keeps the first of equals
    return best, settings


def settings_csv(settings: list[Setting]) -> str:
    keys = [k for k, _ in settings[0].params]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*keys, "fpr95", "auroc"])
    writer.writerows([*(v for _, v in s.params), s.fpr95, s.auroc] for s in settings)
    return buffer.getvalue()


def with_params(specs: dict[str, tuple[str, dict]], name: str, params: dict[str, Any]) -> dict[str, dict]:
    """The model's scorer mapping with ``params`` applied to every scorer registered as ``name`` (added under its
    name when the config has none)."""
    out = {label: {"scorer": scorer, **(dict(p, **params) if scorer == name else p)}
           for label, (scorer, p) in specs.items()}  # fmt: skip
    if not any(scorer == name for scorer, _ in specs.values()):
        out[name] = {"scorer": name, **params}
    return out


def selected_scorers(specs: dict[str, tuple[str, dict]], best: Candidate, name: str = "fmls") -> dict[str, dict]:
    """The model's scorer mapping with the chosen p and lambda applied to the tuned method and its registered
    variants (every configured scorer of its :func:`~lightning_ood.scoring.registry.family`); a variant whose
    registration switches clipping off (``fm_ls``: ``clip: None``) keeps it off."""
    kind = family(name)
    out = {}
    for label, (scorer, params) in specs.items():
        params = dict(params)
        if kind is not None and family(scorer) is kind:
            params["percentile"] = best.percentile
            if presets(scorer).get("clip", 0.0) is not None:
                params.pop("clip_percentile", None)  # the chosen lambda replaces a percentile rule
                params["clip"] = best.clip
        out[label] = {"scorer": scorer, **params}
    return out


# ------------------------------------------------------------------------------------------------ selections
@dataclass
class Selected:
    """What a selection procedure chose, for ``lightning-ood tune`` to report and write."""

    params: dict[str, Any]
    summary: str
    fpr95: float
    auroc: float
    size: int
    csv: str
    scorers: dict[str, dict]  # the model's scorer mapping with the choice applied (the overlay)
    table: Table


class GridSelection:
    """A scorer's declared ``search_space`` (or ``--grid``): every setting of the Cartesian product scored on cached
    features; the lowest FPR95, then the highest AUROC, then the grid's first setting."""

    def check(self, name: str, scorer: type[Scorer], grid: dict | None) -> None:
        space = grid or scorer.search_space
        if not space:
            raise ConfigError(f"Scorer {name!r} declares no search space: give one with --grid '{{name: [values]}}'.")
        for key, values in space.items():
            if not isinstance(values, list | tuple) or not values:
                raise ConfigError(f"--grid: {key} needs a non-empty list of values, got {values!r}.")
        build_scorer(name, **{k: v[0] for k, v in space.items()})  # unknown or invalid hyperparameters: now

    def run(self, name, stats, head, id_val, ood_val, specs, grid=None, **_) -> Selected:
        grid = grid or dict(build_scorer(name).search_space)
        best, settings = select_scorer(name, stats, head, id_val, ood_val, grid)
        table = Table(title=f"tune: validation FPR95 % (AUROC %) of {name}")
        for key in grid:
            table.add_column(key)
        table.add_column("FPR95", justify="right")
        table.add_column("AUROC", justify="right")
        for setting in settings:
            style = "bold green" if setting == best else ""
            cells = [*(str(v) for _, v in setting.params), f"{100 * setting.fpr95:.2f}", f"{100 * setting.auroc:.2f}"]
            table.add_row(*(f"[{style}]{c}[/]" if style else c for c in cells))
        params = dict(best.params)
        return Selected(
            params, ", ".join(f"{k} = {v}" for k, v in params.items()), best.fpr95, best.auroc, len(settings),
            settings_csv(settings), with_params(specs, name, params), table,
        )  # fmt: skip


class PaperSelection:
    """The paper's procedure (Section V-F): masking percentile p x clipping threshold lambda (absolute ``clips``, or
    ``clip_percentiles`` of the training activations), the lowest FPR95, then the highest AUROC, then the least
    intrusive setting (largest lambda, smallest p); the choice applies to the method's registered variants."""

    def check(self, name: str, scorer: type[Scorer], grid: dict | None) -> None:
        pass  # its grid comes from --percentiles and --clips / --clip_percentiles, checked by the command

    def run(self, name, stats, head, id_val, ood_val, specs, percentiles=DEFAULT_PERCENTILES, clips=None,
            clip_percentiles=DEFAULT_CLIP_PERCENTILES, **_) -> Selected:  # fmt: skip
        best, grid = select_fmls(stats, head, id_val, ood_val, percentiles, clips, clip_percentiles, name)
        lam = f"lambda = {best.clip:.6g}" + (
            f" (the {best.clip_percentile:g}th percentile of training activations)" if best.clip_percentile else ""
        )
        return Selected(
            {"percentile": best.percentile, "clip": best.clip}, f"p = {best.percentile:g}, {lam}", best.fpr95,
            best.auroc, len(grid), to_csv(grid), selected_scorers(specs, best, name),
            paper_grid_table(name, grid, best),
        )  # fmt: skip


def paper_grid_table(name: str, grid: list[Candidate], best: Candidate) -> Table:
    clips = sorted({c.clip for c in grid})
    table = Table(title=f"tune: validation FPR95 % (AUROC %) of {name}, ID validation vs validation OOD images")
    table.add_column("p \\ lambda")
    for clip in clips:
        q = next(c.clip_percentile for c in grid if c.clip == clip)
        table.add_column(f"{clip:.3g}" + (f"\n(q{q:g})" if q is not None else ""), justify="right")
    for p in sorted({c.percentile for c in grid}):
        cells = []
        for clip in clips:
            c = next(c for c in grid if c.percentile == p and c.clip == clip)
            cell = f"{100 * c.fpr95:.1f} ({100 * c.auroc:.1f})"
            cells.append(f"[bold green]{cell}[/]" if c == best else cell)
        table.add_row(f"{p:g}", *cells)
    return table


# how `lightning-ood tune` selects, by the name a scorer class declares in its `selection`
SELECTIONS = {"grid": GridSelection(), "paper": PaperSelection()}


# ------------------------------------------------------------------------------------------------ sweeps
@dataclass(frozen=True)
class SweepPoint:
    sweep: str  # "lambda" or "percentile"
    scorer: str
    value: float
    ood: str
    fpr95: float
    auroc: float


def sensitivity_sweeps(
    stats: FeatureStatistics,
    head: nn.Linear,
    id_test: FeatureSet,
    oods: dict[str, FeatureSet],
    lambdas: Sequence[float],
    percentiles: Sequence[float],
    percentile: float = 60.0,
    clip: float = 1.0,
    line_params: dict | None = None,
) -> list[SweepPoint]:
    """FPR95/AUROC per OOD set over lambda (fmls at ``percentile``, LINE and ReAct with the same clip) and over p
    (fmls at ``clip``; LINE at its own masks and ``clip`` as the reference line of the paper's Figure 7)."""
    line_params = dict(line_params or {})
    points: list[SweepPoint] = []

    def evaluate(sweep: str, label: str, value: float, name: str, **params) -> None:
        engine = cached_engine(head, {name: {"scorer": name, **params}}, stats)
        id_scores = engine.score_cached(id_test)[name]
        for ood, data in oods.items():
            m = ood_metrics(id_scores, engine.score_cached(data)[name])
            points.append(SweepPoint(sweep, label, float(value), ood, m["fpr95"], m["auroc"]))

    for lam in lambdas:
        evaluate("lambda", "fmls", lam, "fmls", percentile=percentile, clip=lam)
        evaluate("lambda", "line", lam, "line", **{**line_params, "clip": lam})
        evaluate("lambda", "react", lam, "react", clip=lam)
    line_reference = {**line_params, "clip": line_params.get("clip", clip)}
    for p in percentiles:
        evaluate("percentile", "fmls", p, "fmls", percentile=p, clip=clip)
        evaluate("percentile", "line", p, "line", **line_reference)  # does not depend on p: a reference
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
    """Rows = OOD sets and their average, columns = FPR95 and AUROC in %, one line per scorer; ``configured`` (the
    config's value) and the value with the best average FPR95 of ``fmls`` (in hindsight, on these OOD sets) are
    marked."""
    points = [p for p in points if p.sweep == sweep]
    average = [p for p in points if p.scorer == "fmls" and p.ood == "Average"]
    best = min(average, key=lambda p: (p.fpr95, -p.auroc)).value if average else None
    oods = list(dict.fromkeys(p.ood for p in points))
    scorers = list(dict.fromkeys(p.scorer for p in points))
    figure, axes = plt.subplots(len(oods), 2, figsize=(8, 2.4 * len(oods)), squeeze=False, dpi=100)
    styles = {"fmls": ("tab:red", "-"), "line": ("tab:blue", "--"), "react": ("tab:green", ":")}
    for row, ood in enumerate(oods):
        for col, metric in enumerate(("fpr95", "auroc")):
            axis = axes[row][col]
            for scorer in scorers:
                series = sorted(
                    (p.value, 100 * getattr(p, metric)) for p in points if p.ood == ood and p.scorer == scorer
                )
                colour, style = styles.get(scorer, (None, "-"))
                axis.plot(*zip(*series, strict=True), style, marker="o", markersize=3, color=colour, label=scorer)
            if configured is not None:
                axis.axvline(
                    configured, color="black", linestyle="--", linewidth=1, label=f"configured {configured:.3g}"
                )
            if best is not None:
                axis.axvline(best, color="tab:red", linestyle=":", linewidth=1, label=f"best average {best:.3g}")
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
