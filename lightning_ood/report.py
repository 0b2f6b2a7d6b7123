"""Result tables like the paper's: per (scorer, OOD set) FPR95 / AUROC / AUPR, averages over the OOD sets, and the
paper's own figures beside ours where the setting matches (dataset, backbone, method, OOD set).

All values are percentages, as in the paper. FPR95 is lower-is-better; AUROC and AUPR higher-is-better.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import Tensor

from lightning_ood.io import atomic_write, atomic_write_text
from lightning_ood.scoring import paper_name

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
SCORES_FILE = "ood_scores.pt"
METRIC_TITLES = {"fpr95": "FPR95↓", "auroc": "AUROC↑", "aupr_in": "AUPR-In↑", "aupr_out": "AUPR-Out↑"}

# Our names -> the paper's table names.
DATASET_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet-1k"}
BACKBONE_TITLES = {
    "resnet18": "ResNet-18",
    "densenet100": "DenseNet",
    "resnet50": "ResNet-50",
    "mobilenet_v2": "MobileNet",
    "vit_b_16": "ViT-B/16",
    "vit_base_patch16_224": "ViT-B/16",
}
OOD_TITLES = {
    "mnist": "MNIST",
    "fashion_mnist": "F-MNIST",
    "tin": "TIN",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "gaussian_noise": "Noise",
    "uniform_noise": "Uniform",
    "svhn": "SVHN",
    "lsun_crop": "LSUN-C",
    "lsun_resize": "LSUN-R",
    "isun": "iSUN",
    "textures": "Textures",
    "places365": "Places365",
    "inaturalist": "iNaturalist",
    "sun": "SUN",
    "places": "Places",
}


@cache
def paper_results() -> dict[tuple[str, str, str, str], tuple[float, float]]:
    """The paper's figures shipped with the package: (dataset, backbone, method, OOD set) -> (FPR95, AUROC)."""
    text = files("lightning_ood").joinpath("reference/paper_results.csv").read_text()
    table = {}
    for row in csv.DictReader(io.StringIO(text)):
        key = (row["id_dataset"], row["model"], row["method"].replace(" ", ""), row["ood"])
        table[key] = (float(row["fpr95"]), float(row["auroc"]))
    return table


@cache
def paper_ood_sets(dataset: str, model: str) -> frozenset[str]:
    """The OOD sets (paper titles) the paper's tables average over for this dataset and model."""
    return frozenset(k[3] for k in paper_results() if k[:2] == (dataset, model) and k[3] != "Average")


def paper_figure(
    id_name: str, backbone: str, scorer: str, ood: str, oods: tuple[str, ...] | None = None
) -> tuple[float, float] | None:
    """The paper's (FPR95, AUROC) for this setting, or ``None`` when the paper has no such number. The paper's
    ``Average`` only compares with ours when ``oods`` (our OOD sets) are the paper's sets."""
    method = paper_name(scorer)
    dataset, model = DATASET_TITLES.get(id_name), BACKBONE_TITLES.get(backbone)
    ood_title = "Average" if ood == "Average" else OOD_TITLES.get(ood)
    if None in (method, dataset, model, ood_title):
        return None
    if ood == "Average" and oods is not None and {OOD_TITLES.get(o) for o in oods} != paper_ood_sets(dataset, model):
        return None  # an average over other sets than the paper's
    return paper_results().get((dataset, model, method.replace(" ", ""), ood_title))


@dataclass
class OODReport:
    """Everything one test pass measured.

    Attributes:
        id_name: ID dataset name (``cifar10``).
        backbone: backbone name (``resnet18``).
        accuracy: ID top-1 accuracy in [0, 1].
        metrics: ``metrics[scorer][ood][metric]`` in [0, 1].
        num_images: images per test set (ID first).
        skipped: OOD sets that were configured but not evaluated, with the reason.
        skipped_images: undecodable images left out, per OOD set (``bad_images: skip``).
        provenance: what produced the numbers (weights, input normalisation, statistics images, scorer
            hyperparameters, ...), written with every result file.
        tpr: the TPR of the FPR metric (``metrics[...]["fpr95"]`` holds the FPR at this TPR); outputs label it
            ``FPR95`` at the paper's 0.95 and ``FPR<100 tpr>`` otherwise, with no paper figure beside it then.
        fpr_positive: ``id`` (the paper's FPR: ID positive) or ``ood`` (OpenOOD v1.5's: OOD positive), labelled
            ``FPR95 (OOD+)`` and stored as ``fpr95_ood``; no paper figure beside it. The threshold rule,
            ``provenance["fpr_threshold"]``, is labelled ``(closest TPR)`` when it is the paper's code's ``closest``.
        groups: OOD set -> group (``near``, ``far``): each group gets its own average column and rows.
        scores: ``scores[scorer][set]``, every image's score in dataset order (higher = more in-distribution),
            written to ``ood_scores.pt``; empty when not kept.
    """

    id_name: str
    backbone: str
    accuracy: float
    metrics: dict[str, dict[str, dict[str, float]]]
    num_images: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    skipped_images: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, object] = field(default_factory=dict)
    tpr: float = 0.95
    fpr_positive: str = "id"
    groups: dict[str, str] = field(default_factory=dict)
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    @property
    def fpr_label(self) -> str:
        """``FPR95`` at the paper's TPR, else ``FPR<TPR in %>`` (``FPR90``, ``FPR100``); ``(OOD+)`` for OpenOOD's,
        ``(closest TPR)`` for the threshold at the TPR nearest to it (``model.fpr_threshold: closest``)."""
        label = f"FPR{100 * self.tpr:.4g}"
        label = f"{label} (OOD+)" if self.fpr_positive == "ood" else label
        return f"{label} (closest TPR)" if self.provenance.get("fpr_threshold") == "closest" else label

    @property
    def comparable_fpr(self) -> bool:
        """Whether our FPR is the paper's metric (ID positive, TPR 95%)."""
        return self.tpr == 0.95 and self.fpr_positive == "id"

    def output_key(self, metric: str) -> str:
        if metric != "fpr95":
            return metric
        key = f"fpr{100 * self.tpr:.4g}"
        return f"{key}_ood" if self.fpr_positive == "ood" else key

    def title(self, metric: str) -> str:
        return f"{self.fpr_label}↓" if metric == "fpr95" else METRIC_TITLES[metric]

    @property
    def group_names(self) -> list[str]:
        """The OOD groups in first-seen order (``near``, ``far``)."""
        return list(dict.fromkeys(self.groups[o] for o in self.ood_names if o in self.groups))

    @property
    def average_columns(self) -> list[str]:
        """``Average (near)``, ``Average (far)`` when the OOD sets are grouped, then ``Average``."""
        return [*(f"Average ({g})" for g in self.group_names), "Average"]

    @property
    def scorers(self) -> list[str]:
        return list(self.metrics)

    @property
    def ood_names(self) -> list[str]:
        return list(next(iter(self.metrics.values()), {}))

    def average(self, scorer: str, group: str | None = None) -> dict[str, float]:
        """Mean of each metric over the OOD sets (the paper's "Average" column), or over one group's."""
        per_set = [v for o, v in self.metrics[scorer].items() if group is None or self.groups.get(o) == group]
        return {m: sum(v[m] for v in per_set) / len(per_set) for m in METRICS}

    def paper(self, scorer: str, ood: str) -> tuple[float, float] | None:
        """The paper's (FPR95, AUROC) of this cell; the FPR only compares at the paper's TPR (NaN otherwise)."""
        if ood.startswith("Average ("):
            return None  # the paper has no group averages
        figure = paper_figure(self.id_name, self.backbone, scorer, ood, tuple(self.ood_names))
        if figure is not None and not self.comparable_fpr:
            return (float("nan"), figure[1])
        return figure

    # ------------------------------------------------------------------------------------------------ values
    @property
    def columns(self) -> list[str]:
        """Every column of the tables: the OOD sets, the group averages, the average."""
        return [*self.ood_names, *self.average_columns]

    def percent(self, scorer: str, column: str, metric: str) -> float:
        """The value in %, rounded to 0.01 and clamped to [0, 100] (float32 sums can land a hair outside)."""
        return round(min(100.0, max(0.0, 100 * self._values(scorer, column)[metric])), 2)

    def paper_value(self, scorer: str, column: str, metric: str) -> float | None:
        """The paper's figure of this cell, when the paper reports it with the same metric."""
        paper = self.paper(scorer, column) if metric in ("fpr95", "auroc") else None
        value = paper[0 if metric == "fpr95" else 1] if paper else None
        return None if value is None or value != value else value

    def ranks(self, column: str, metric: str) -> dict[str, int]:
        """0 for the best scorer of a column, 1 for the second (ties share a rank); lower FPR, higher others."""
        sign = 1 if metric == "fpr95" else -1
        values = sorted({sign * self.percent(s, column, metric) for s in self.scorers})
        return {s: values.index(sign * self.percent(s, column, metric)) for s in self.scorers}

    def column_title(self, column: str) -> str:
        return OOD_TITLES.get(column, column)

    def set_sizes(self) -> str:
        sizes = ", ".join(f"{self.column_title(o)} {self.num_images.get(o, '?')}" for o in self.ood_names)
        return f"ID {self.id_name}: {self.num_images.get(self.id_name, '?')} images; OOD: {sizes}"

    # ------------------------------------------------------------------------------------------------ renderers
    def rows(self) -> list[dict[str, object]]:
        """Long format: one row per (scorer, OOD set) plus the average rows per scorer; values in percent."""
        out = []
        for scorer in self.scorers:
            for column in self.columns:
                paper_fpr = self.paper_value(scorer, column, "fpr95")
                paper_auroc = self.paper_value(scorer, column, "auroc")
                fpr, auroc = self.percent(scorer, column, "fpr95"), self.percent(scorer, column, "auroc")
                out.append(
                    {
                        "id_dataset": self.id_name,
                        "backbone": self.backbone,
                        "scorer": scorer,
                        "paper_method": paper_name(scorer) or "",
                        "ood": column,
                        "images": self.num_images.get(column, ""),
                        **{self.output_key(m): self.percent(scorer, column, m) for m in METRICS},
                        "paper_fpr95": paper_fpr if paper_fpr is not None else "",
                        "paper_auroc": paper_auroc if paper_auroc is not None else "",
                        "diff_fpr95": round(fpr - paper_fpr, 2) if paper_fpr is not None else "",
                        "diff_auroc": round(auroc - paper_auroc, 2) if paper_auroc is not None else "",
                    }
                )
        return out

    def to_csv(self) -> str:
        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["scorer"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def _cell(self, scorer: str, column: str, metric: str) -> str:
        """Ours, and where the paper reports the cell: (paper, ours - paper)."""
        ours = self.percent(scorer, column, metric)
        theirs = self.paper_value(scorer, column, metric)
        return f"{ours:.2f}" if theirs is None else f"{ours:.2f} ({theirs:.2f}, {ours - theirs:+.2f})"

    def to_markdown(self) -> str:
        """The paper's Table I shape, one table per metric (FPR, AUROC, AUPR-In, AUPR-Out): the OOD sets, then the
        averages; the best of a column in bold and the second underlined, as in the paper."""
        compared = any(
            self.paper_value(s, c, m) is not None for s in self.scorers for c in self.columns for m in METRICS
        )
        legend = "; where the paper reports the cell: (the paper's figure, ours minus the paper's)" if compared else ""
        lines = [
            f"ID: {self.id_name}, backbone: {self.backbone}, accuracy: {100 * self.accuracy:.2f}%. Values in %"
            f"{legend}. **Best**, <u>second</u>.",
            "",
            f"Images: {self.set_sizes()}.",
        ]
        columns = self.columns
        for metric in METRICS:
            ranks = {c: self.ranks(c, metric) for c in columns}
            lines += ["", f"### {self.title(metric)}", ""]
            lines.append("| Method | " + " | ".join(self.column_title(c) for c in columns) + " |")
            lines.append("|---|" + "---:|" * len(columns))
            for scorer in self.scorers:
                cells = []
                for column in columns:
                    cell, rank = self._cell(scorer, column, metric), ranks[column][scorer]
                    cells.append(f"**{cell}**" if rank == 0 else f"<u>{cell}</u>" if rank == 1 else cell)
                lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
        if self.skipped:
            lines += ["", "Skipped OOD sets: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())]
        if self.skipped_images:
            left_out = ", ".join(f"{k}: {v}" for k, v in self.skipped_images.items())
            lines += ["", f"Undecodable images left out: {left_out}"]
        if self.provenance:
            lines += ["", "Provenance:", *(f"- {k}: {v}" for k, v in self.provenance.items())]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        """The paper's layout (booktabs): a method per row, FPR95 and AUROC per OOD set, then the averages; the best
        of a column in bold, the second underlined."""
        columns = self.columns
        spec = "l" + "rr" * len(columns)
        title_row = " & ".join(rf"\multicolumn{{2}}{{c}}{{{latex_escape(self.column_title(c))}}}" for c in columns)
        rules = " ".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(columns)))
        metrics_row = " & ".join(r"FPR95$\downarrow$ & AUROC$\uparrow$" for _ in columns)
        if self.fpr_label != "FPR95":
            metrics_row = metrics_row.replace("FPR95", latex_escape(self.fpr_label))
        lines = [
            rf"% {latex_escape(self.id_name)} / {latex_escape(self.backbone)}, accuracy {100 * self.accuracy:.2f}\%",
            r"\begin{tabular}{" + spec + "}",
            r"\toprule",
            rf"Method & {title_row} \\",
            rules,
            rf" & {metrics_row} \\",
            r"\midrule",
        ]
        ranks = {(c, m): self.ranks(c, m) for c in columns for m in ("fpr95", "auroc")}
        for scorer in self.scorers:
            cells = []
            for column in columns:
                for metric in ("fpr95", "auroc"):
                    value, rank = f"{self.percent(scorer, column, metric):.2f}", ranks[(column, metric)][scorer]
                    cells.append(
                        rf"\textbf{{{value}}}" if rank == 0 else rf"\underline{{{value}}}" if rank == 1 else value
                    )
            name = paper_name(scorer) or scorer
            lines.append(f"{latex_escape(name)} & " + " & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def rich_tables(self, width: int = 120, colour: bool = True) -> list[Table]:
        """Console tables for ``width`` columns (120: six OOD sets, the near/far averages and the average fit): one
        for the FPR, one for the AUROC; a cell is ours, with the signed difference to the paper's figure where the
        paper reports it, unless the differences would not fit (then the legend points to the markdown file, which
        always has them). Names and numbers are never cut (column headers wrap instead). The best of a column is green,
        or, for a console without colours (a log file), marked with ``*``."""
        notes = [f"skipped sets: {', '.join(self.skipped)}"] if self.skipped else []
        notes += [f"undecodable images left out: {self.skipped_images}"] if self.skipped_images else []
        tables = []
        for metric in ("fpr95", "auroc"):
            compared = any(self.paper_value(s, c, metric) is not None for s in self.scorers for c in self.columns)
            rows = self._console_rows(metric, compared)
            star = 0 if colour else 1  # the mark's character
            if compared and self._console_width(rows) + star * len(self.columns) > width:
                rows, compared = self._console_rows(metric, False), None
            best = "green: the best" if colour else "*: the best"
            legend = {
                True: f"(+x.xx): ours minus the paper's figure; {best}",
                False: best,
                None: f"{best}; ours minus the paper's figures: in ood_results.md (too wide here)",
            }[compared]
            table = Table(
                title=f"{self.title(metric)} %: {self.id_name} / {self.backbone} (accuracy {100 * self.accuracy:.2f}%)",
                caption="; ".join([legend, *notes]),
                box=box.SIMPLE_HEAD,
                pad_edge=False,
            )
            table.add_column("Method", no_wrap=True, style="bold", min_width=max(map(len, self.scorers), default=6))
            for i, column in enumerate(self.columns):
                widest = max((len(cells[i]) for cells in rows.values()), default=1) + star
                table.add_column(self.column_title(column), justify="right", min_width=widest)
            ranks = {c: self.ranks(c, metric) for c in self.columns}
            for scorer, cells in rows.items():
                marked = [
                    (f"[green]{cell}[/]" if colour else f"{cell}*") if ranks[column][scorer] == 0 else cell
                    for cell, column in zip(cells, self.columns, strict=True)
                ]
                table.add_row(scorer, *marked)
            tables.append(table)
        return tables

    def _console_rows(self, metric: str, differences: bool) -> dict[str, list[str]]:
        rows = {}
        for scorer in self.scorers:
            cells = []
            for column in self.columns:
                ours = self.percent(scorer, column, metric)
                theirs = self.paper_value(scorer, column, metric) if differences else None
                cells.append(f"{ours:.2f}" if theirs is None else f"{ours:.2f} {ours - theirs:+.2f}")
            rows[scorer] = cells
        return rows

    def _console_width(self, rows: dict[str, list[str]]) -> int:
        """Characters a table of these cells needs: each column's widest cell, one space of padding either side."""
        widths = [max(map(len, self.scorers), default=6)]
        widths += [max(len(cells[i]) for cells in rows.values()) for i in range(len(self.columns))]
        return sum(widths) + 2 * len(widths) - 2

    def _values(self, scorer: str, column: str) -> dict[str, float]:
        if column == "Average":
            return self.average(scorer)
        if column.startswith("Average ("):
            return self.average(scorer, column[len("Average (") : -1])
        return self.metrics[scorer][column]

    def to_json(self) -> str:
        """Every measured value at full precision (fractions, clamped to [0, 1]), for programs."""
        payload = {
            "id_dataset": self.id_name,
            "backbone": self.backbone,
            "accuracy": self.accuracy,
            "num_images": self.num_images,
            "skipped": self.skipped,
            "skipped_images": self.skipped_images,
            "tpr": self.tpr,
            "metrics": {s: {o: self._renamed(v) for o, v in per.items()} for s, per in self.metrics.items()},
            "average": {s: self._renamed(self.average(s)) for s in self.scorers} if self.ood_names else {},
            "groups": self.groups,
            "group_average": {
                g: {s: self._renamed(self.average(s, g)) for s in self.scorers} for g in self.group_names
            },
            "fpr_positive": self.fpr_positive,
            "provenance": self.provenance,
        }
        return json.dumps(payload, indent=1, default=str)

    def _renamed(self, values: dict[str, float]) -> dict[str, float]:
        return {self.output_key(k): min(1.0, max(0.0, v)) for k, v in values.items()}

    def write(self, folder: str | Path) -> tuple[Path, ...]:
        """Write ``ood_results.{md,csv,json,tex}`` into ``folder`` (atomically), and ``ood_scores.pt`` when the
        report holds every image's score (:meth:`scores_payload`)."""
        folder = Path(folder)
        written = (
            atomic_write_text(folder / "ood_results.md", self.to_markdown()),
            atomic_write_text(folder / "ood_results.csv", self.to_csv()),
            atomic_write_text(folder / "ood_results.json", self.to_json()),
            atomic_write_text(folder / "ood_results.tex", self.to_latex()),
        )
        if not self.scores:
            return written
        payload = self.scores_payload()
        return (*written, atomic_write(folder / SCORES_FILE, lambda f: torch.save(payload, f)))

    def scores_payload(self) -> dict:
        """What ``ood_scores.pt`` holds: ``{"id": ID set, "ood": [OOD sets], "scores": {scorer: {set: (N,)}}}``, one
        score per image in dataset order. Tensors, strings and lists only: it loads with ``torch.load(path,
        weights_only=True)``."""
        return {"id": self.id_name, "ood": list(self.ood_names), "scores": self.scores}


def results_console() -> Console:
    """The console of the result tables: the terminal's width; 120 columns when the output is not a terminal (a log
    file, a pipe: rich would assume 80) unless ``COLUMNS`` says otherwise."""
    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console()
    return Console(width=120)


def latex_escape(text: str) -> str:
    return "".join({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#"}.get(ch, ch) for ch in str(text))
