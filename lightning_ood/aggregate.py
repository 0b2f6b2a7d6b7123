"""Several runs of one setting (seeds, checkpoints) aggregated into mean +- std tables, as OpenOOD reports three
checkpoints per model: markdown, CSV and LaTeX, from the runs' ``ood_results.json``."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from lightning_ood.errors import ConfigError, DataError
from lightning_ood.report import METRIC_TITLES, OOD_TITLES, latex_escape
from lightning_ood.scoring.registry import SCORERS, defaults

RESULTS = "ood_results.json"


def find_results(paths: list[str]) -> list[Path]:
    """The ``ood_results.json`` of each run folder (or the files themselves), in the given order."""
    found = []
    for path in map(Path, paths):
        target = path / RESULTS if path.is_dir() else path
        if not target.is_file():
            raise DataError(f"{path} holds no {RESULTS}: give run folders of `lightning-ood test` (or the JSON files).")
        found.append(target)
    if len(found) < 2:
        raise ConfigError(f"report aggregates several runs: give at least two run folders, got {len(found)}.")
    return found


# what `lightning-ood test` writes into ood_results.json that report reads, and how many levels of mappings lie above
# the numbers (metrics: scorer -> OOD set -> metric -> value); optional fields are checked when present
REQUIRED = {"id_dataset": str, "backbone": str, "accuracy": 0, "num_images": 1, "metrics": 3, "average": 2}
OPTIONAL = {"tpr": 0, "fpr_positive": str, "groups": dict, "group_average": 3, "provenance": dict}
REDO = "rerun `lightning-ood test` for that run, or leave it out."
UNSET = object()  # a setting one run records and another does not (a hyperparameter left at its default)


def load_results(path: Path) -> dict:
    """One run's ``ood_results.json``, checked to hold what ``lightning-ood test`` writes: a damaged file (cut short,
    empty, not the results mapping) is a :class:`DataError` naming it and what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start}): a damaged file; {REDO}"
        ) from err
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror or err}).") from err
    if not text.strip():
        raise DataError(f"{path} is empty: a run cut short or a damaged file; {REDO}")
    try:
        run = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}): a run cut short or a "
            f"damaged file; {REDO}"
        ) from err
    problem = results_problem(run)
    if problem:
        raise DataError(f"{path} does not hold the results of `lightning-ood test`: {problem}; {REDO}")
    if not run["metrics"]:
        raise DataError(f"{path} holds no OOD metrics (its run tested no OOD set): report aggregates OOD metrics.")
    return run


def results_problem(run: object) -> str | None:
    """What keeps ``run`` (parsed JSON) from being results that :meth:`Aggregate.of` can average, or None."""
    if not isinstance(run, dict):
        return f"it holds {_kind(run)}, not a mapping"
    missing = [key for key in REQUIRED if key not in run]
    if missing:
        return f"it lacks {', '.join(missing)}"
    fields = {**REQUIRED, **{key: shape for key, shape in OPTIONAL.items() if key in run}}
    for key, shape in fields.items():
        problem = _shape_problem(run[key], key, shape)
        if problem:
            return problem
    return _tables_problem(run)


def _shape_problem(value: object, name: str, shape: type | int) -> str | None:
    """Whether ``value`` is of type ``shape``, or (an int) that many levels of mappings above numbers."""
    if isinstance(shape, type):
        return None if isinstance(value, shape) else f"{name} is {_kind(value)}, not {_kind(shape())}"
    if shape == 0:
        return None if _kind(value) == "a number" else f"{name} is {_kind(value)}, not a number"
    if not isinstance(value, dict):
        return f"{name} is {_kind(value)}, not a mapping"
    return next(filter(None, (_shape_problem(v, f"{name}.{k}", shape - 1) for k, v in value.items())), None)


def _tables_problem(run: dict) -> str | None:
    """Whether every scorer has every OOD set, an average and a cell in every group average, with the same metrics."""
    metrics = run["metrics"]
    averages = {"average": run["average"], **{f"group_average.{g}": v for g, v in run.get("group_average", {}).items()}}
    first = next(iter(metrics), None)
    cells = {}
    for scorer, per_ood in metrics.items():
        if set(per_ood) != set(metrics[first]):
            return f"metrics.{scorer} has other OOD sets than metrics.{first}"
        cells.update({f"metrics.{scorer}.{ood}": cell for ood, cell in per_ood.items()})
        for table, per_scorer in averages.items():
            if scorer not in per_scorer:
                return f"{table} lacks {scorer}"
            cells[f"{table}.{scorer}"] = per_scorer[scorer]
    names = list(cells)
    for name, cell in cells.items():
        if set(cell) != set(cells[names[0]]):
            return f"{name} has other metrics than {names[0]}"
    return None


def _kind(value: object) -> str:
    """The JSON type of ``value``, for messages: ``a mapping``, ``a list``, ``a string``, ``a number``, ..."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def check_one_setting(paths: list[Path], runs: list[dict]) -> None:
    """Refuse, naming the runs and the settings, runs that are not of one setting: other data, backbone, scorers or
    OOD sets, or another recorded setting (:func:`run_settings`) than the first run's."""
    first = runs[0]
    for path, run in zip(paths[1:], runs[1:], strict=True):
        if (run["id_dataset"], run["backbone"]) != (first["id_dataset"], first["backbone"]):
            raise ConfigError(
                f"{path} is {run['id_dataset']} / {run['backbone']}, {paths[0]} {first['id_dataset']} / "
                f"{first['backbone']}: report aggregates runs of one setting."
            )
        if list(run["metrics"]) != list(first["metrics"]) or run["num_images"] != first["num_images"]:
            raise ConfigError(
                f"{path} and {paths[0]} differ in their scorers or OOD sets; aggregate runs of one configuration."
            )
    ours = run_settings(first)
    differing = []
    for path, run in zip(paths[1:], runs[1:], strict=True):
        theirs = run_settings(run)
        found = [d for key in ours if key in theirs for d in _differences(key, theirs[key], ours[key])]
        if found:
            differing.append(f"{path} has {', '.join(found)}")
    if differing:
        raise ConfigError(
            f"Runs of different settings, compared with {paths[0]}: {'; '.join(differing)}. report averages runs of "
            f"one setting, which differ only in weights, checkpoint and seed: report each setting separately."
        )


def run_settings(run: dict) -> dict[str, object]:
    """The settings a run's results record beyond its data, backbone, scorers and OOD sets, which runs of one setting
    share: the FPR's TPR, positive class and threshold rule, the metrics, the near/far grouping, each scorer's
    hyperparameters and the statistics images. A setting a run does not record (an older file, a run without groups)
    is not compared.

    Not settings: what differs between runs of one setting or follows from where they ran: the weights, checkpoint,
    weights fingerprint and input normalisation (it belongs to the weights), seed, package version, commit and date;
    the test sets' sources (folders on that machine; their sizes are compared as ``num_images``) and the count of
    statistics images (it follows from the statistics images)."""
    provenance = run.get("provenance", {})
    settings = {
        "tpr": run.get("tpr"),
        "fpr_positive": run.get("fpr_positive"),
        "fpr_threshold": provenance.get("fpr_threshold"),  # absent from older files: first_at_tpr then
        "metrics": sorted(next(iter(run["average"].values()))),
        "groups": run.get("groups") or None,
        "scorers": _with_defaults(provenance.get("scorers")),
        "statistics_images": provenance.get("statistics_images"),
    }
    return {key: value for key, value in settings.items() if value is not None}


def _with_defaults(scorers: object) -> object:
    """The recorded scorers (``{label: {scorer: name, **hyperparameters}}``, as given in the config) with what each
    leaves unset filled in from the registry (its presets, then its constructor's defaults): a hyperparameter left
    at its default and the same value given are one setting."""
    if not isinstance(scorers, dict):
        return scorers
    return {label: _scorer_with_defaults(spec) for label, spec in scorers.items()}


def _scorer_with_defaults(spec: object) -> object:
    if not isinstance(spec, dict) or spec.get("scorer") not in SCORERS:
        return spec  # a scorer this version does not register: compared as recorded
    return json.loads(json.dumps({**defaults(spec["scorer"]), **spec}, default=str))  # tuples as JSON lists


def _differences(name: str, theirs: object, ours: object) -> list[str]:
    """``name = theirs (vs ours)`` where the values differ, down to the differing entries of mappings
    (``scorers.fmls.percentile = 60 (vs 30)``)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        keys = list({**ours, **theirs})
        return [d for k in keys for d in _differences(f"{name}.{k}", theirs.get(k, UNSET), ours.get(k, UNSET))]
    return [] if theirs == ours else [f"{name} = {_shown(theirs)} (vs {_shown(ours)})"]


def _shown(value: object) -> str:
    return "unset" if value is UNSET else json.dumps(value, sort_keys=True, default=str)


@dataclass
class Aggregate:
    """Mean and sample standard deviation (n - 1) over runs of every metric of every (scorer, column)."""

    runs: list[Path]
    id_name: str
    backbone: str
    scorers: list[str]
    columns: list[str]
    keys: list[str]  # metric keys as the runs store them (fpr95 or fpr95_ood, auroc, aupr_in, aupr_out)
    values: dict[tuple[str, str, str], list[float]]  # (scorer, column, key) -> one value per run, in %
    accuracy: list[float]

    @classmethod
    def of(cls, paths: list[Path]) -> Aggregate:
        runs = [load_results(p) for p in paths]
        check_one_setting(paths, runs)
        first = runs[0]
        scorers = list(first["metrics"])
        oods = list(next(iter(first["metrics"].values())))
        # near/far averages that every run has (a run of an overlay without groups has none)
        groups = [g for g in first.get("group_average", {}) if all(g in run.get("group_average", {}) for run in runs)]
        columns = [*oods, *(f"Average ({g})" for g in groups), "Average"]
        keys = list(next(iter(first["average"].values())))
        values: dict[tuple[str, str, str], list[float]] = {}
        for run in runs:
            for scorer in scorers:
                for column in columns:
                    if column == "Average":
                        cell = run["average"][scorer]
                    elif column.startswith("Average ("):
                        cell = run["group_average"][column[len("Average (") : -1]][scorer]
                    else:
                        cell = run["metrics"][scorer][column]
                    for key in keys:
                        values.setdefault((scorer, column, key), []).append(100 * cell[key])
        return cls(paths, first["id_dataset"], first["backbone"], scorers, columns, keys, values,
                   [100 * run["accuracy"] for run in runs])  # fmt: skip

    def mean_std(self, scorer: str, column: str, key: str) -> tuple[float, float]:
        v = self.values[(scorer, column, key)]
        return statistics.fmean(v), statistics.stdev(v)

    def title(self, key: str) -> str:
        base = key.removesuffix("_ood")
        title = METRIC_TITLES.get(base, f"{base.upper()}↓" if base.startswith("fpr") else base)
        return title.replace("FPR95", base.upper()) + (" (OOD+)" if key.endswith("_ood") else "")

    def header(self) -> str:
        accuracy = f"{statistics.fmean(self.accuracy):.2f} ± {statistics.stdev(self.accuracy):.2f}"
        return (f"{self.id_name} / {self.backbone}: mean ± standard deviation (n - 1) over {len(self.runs)} runs, "
                f"in %; ID accuracy {accuracy}%.")  # fmt: skip

    def to_markdown(self) -> str:
        lines = [self.header(), "", "Runs: " + ", ".join(str(p.parent) for p in self.runs) + "."]
        for key in self.keys:
            lines += ["", f"### {self.title(key)}", ""]
            lines.append("| Method | " + " | ".join(OOD_TITLES.get(c, c) for c in self.columns) + " |")
            lines.append("|---|" + "---:|" * len(self.columns))
            for scorer in self.scorers:
                cells = ["{:.2f} ± {:.2f}".format(*self.mean_std(scorer, c, key)) for c in self.columns]
                lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id_dataset", "backbone", "scorer", "ood", "metric", "mean", "std", "runs", "values"])
        for scorer in self.scorers:
            for column in self.columns:
                for key in self.keys:
                    mean, std = self.mean_std(scorer, column, key)
                    v = self.values[(scorer, column, key)]
                    writer.writerow([self.id_name, self.backbone, scorer, column, key, round(mean, 4), round(std, 4),
                                     len(v), " ".join(f"{x:.4f}" for x in v)])  # fmt: skip
        return buffer.getvalue()

    def to_latex(self) -> str:
        first, second = self.keys[0], "auroc" if "auroc" in self.keys else self.keys[1]
        spec = "l" + "cc" * len(self.columns)
        titles = " & ".join(rf"\multicolumn{{2}}{{c}}{{{latex_escape(OOD_TITLES.get(c, c))}}}" for c in self.columns)
        pair = rf"{latex_escape(first.upper())}$\downarrow$ & AUROC$\uparrow$"
        lines = [rf"% {latex_escape(self.header())}", r"\begin{tabular}{" + spec + "}", r"\toprule",
                 rf"Method & {titles} \\", rf" & {' & '.join(pair for _ in self.columns)} \\", r"\midrule"]  # fmt: skip
        for scorer in self.scorers:
            cells = []
            for column in self.columns:
                for key in (first, second):
                    cells.append("{:.2f}$\\pm${:.2f}".format(*self.mean_std(scorer, column, key)))
            lines.append(f"{latex_escape(scorer)} & " + " & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
