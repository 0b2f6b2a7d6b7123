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
        runs = [json.loads(p.read_text()) for p in paths]
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
