"""Reporting after the OOD test pass: the result tables (console, markdown, CSV, LaTeX, JSON), the score histograms
(PNG beside the tables and TensorBoard figures), and TensorBoard's HParams and scalars.

Both callbacks read what the test pass measured, ``pl_module.ood_report`` (:class:`~lightning_ood.report.OODReport`,
with every image's score gathered from every rank in dataset order); only rank 0 writes.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from rich.console import Console
from torch import Tensor

from lightning_ood.io import atomic_write
from lightning_ood.metrics import tpr_threshold
from lightning_ood.report import OODReport, results_console
from lightning_ood.scoring import paper_name


def run_folder(trainer: Trainer) -> Path:
    """The run's log folder (``logs/<name>/version_N``), or the default root when there is no logger. A collective
    under DDP: call it on every rank."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class OODResultsTable(Callback):
    """Print the result tables with rich and write ``ood_results.{md,csv,json,tex}`` into the run folder."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = getattr(pl_module, "ood_report", None)
        if report is None:
            return
        folder = run_folder(trainer)  # on every rank: Trainer.log_dir broadcasts under DDP
        if not trainer.is_global_zero:
            return
        if not report.metrics:
            Console().print(f"ID accuracy on {report.id_name}: {100 * report.accuracy:.2f}% (no OOD sets configured)")
            return
        console = results_console()
        for table in report.rich_tables(console.width, colour=console.color_system is not None):
            console.print(table)
        paths = report.write(folder)
        rank_zero_info(f"OOD results written to {paths[0]} ({', '.join(p.suffix for p in paths[:4])}); every image's "
                       f"score in {paths[-1]}.")  # fmt: skip


def robust_range(*values: Tensor) -> tuple[float, float]:
    """[1st percentile, 99th percentile] over the sets (each set's own), so one far-off set does not squeeze the rest
    into a bin; a (nearly) constant score gets a range around it wide enough for distinct float64 bin edges at its
    magnitude (a unit wide near 0, a millionth of the value for a score of 1e12)."""
    lows = [torch.quantile(v.double(), 0.01) for v in values if v.numel()]
    highs = [torch.quantile(v.double(), 0.99) for v in values if v.numel()]
    lo, hi = (float(min(lows)), float(max(highs))) if lows else (0.0, 1.0)
    half = 0.5 * max(1.0, 1e-6 * max(abs(lo), abs(hi)))
    if hi - lo < 2 * half * 1e-3:
        middle = 0.5 * (lo + hi)
        lo, hi = middle - half, middle + half
    return lo, hi


def histogram_figure(scorer: str, scores: dict[str, Tensor], report: OODReport, bins: int = 60):
    """One panel per OOD set: the ID scores against that set's, on shared bins over a robust range (values outside
    are counted in the legend and drawn in the edge bins), as step outlines; the threshold that keeps the TPR of the
    ID scores (95%) dashed; the set's FPR and AUROC in the panel's title."""
    id_name = report.id_name
    oods = report.ood_names
    id_scores = scores[id_name][torch.isfinite(scores[id_name])].double()
    columns = min(3, len(oods))
    rows = -(-len(oods) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), dpi=100, squeeze=False)
    threshold = float(tpr_threshold(id_scores, report.tpr)) if id_scores.numel() else float("nan")
    for axis, ood in zip(axes.flat, oods, strict=False):
        ood_scores = scores[ood][torch.isfinite(scores[ood])].double()
        lo, hi = robust_range(id_scores, ood_scores)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64).numpy()  # float32 edges collide at 1e7
        for values, label, colour in ((id_scores, f"{id_name} (ID)", "tab:blue"), (ood_scores, ood, "tab:red")):
            if not values.numel():  # no finite score: nothing to draw (a density of no values is 0 / 0)
                axis.plot([], [], color=colour, label=f"{label}: no finite score")
                continue
            outside = int(((values < lo) | (values > hi)).sum())
            note = f", {outside} outside" if outside else ""
            axis.hist(values.clamp(lo, hi).numpy(), bins=edges, density=True, histtype="step", linewidth=1.4,
                      color=colour, label=f"{label}: {values.numel()}{note}")  # fmt: skip
        if id_scores.numel():
            axis.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"{100 * report.tpr:g}% TPR")
        metrics = report.metrics[scorer][ood]
        axis.set_title(f"{report.column_title(ood)}: {report.fpr_label} {100 * metrics['fpr95']:.1f}%, "
                       f"AUROC {100 * metrics['auroc']:.1f}%", fontsize=9)  # fmt: skip
        axis.set_xlabel("score (higher = more in-distribution)", fontsize=8)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(oods) :]:
        axis.axis("off")
    name = paper_name(scorer)
    figure.suptitle(
        f"{scorer}" + (f" ({name})" if name and name != scorer else "") + f": {id_name} / {report.backbone}"
    )
    figure.tight_layout()
    return figure


class ScoreHistograms(Callback):
    """Score histograms (one figure per scorer, a panel per OOD set) as PNG in ``<run>/histograms/`` and in
    TensorBoard; TensorBoard scalars of every final metric in % (averages and per OOD set); and HParams with every
    final metric and the scorers' hyperparameters.

    Args:
        bins: histogram bins.
        figures: draw the figures (PNG and TensorBoard).
    """

    def __init__(self, bins: int = 60, figures: bool = True) -> None:
        self.bins = bins
        self.figures = figures

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report: OODReport | None = getattr(pl_module, "ood_report", None)
        if report is None or not report.metrics:
            return
        scores = report.scores  # gathered from every rank at the end of the test epoch
        folder = run_folder(trainer)
        if not trainer.is_global_zero:
            return
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        writer = tensorboard.experiment if tensorboard is not None else None
        step = trainer.global_step
        if self.figures:
            for scorer, per_set in scores.items():
                figure = histogram_figure(scorer, per_set, report, self.bins)
                figure.canvas.draw()  # drawn once, for the file and for TensorBoard
                rgba = np.asarray(figure.canvas.buffer_rgba())  # (H, W, 4)
                plt.close(figure)
                png = io.BytesIO()
                Image.fromarray(rgba).save(png, format="png")
                atomic_write(folder / "histograms" / f"{scorer}.png", lambda f, png=png: f.write(png.getvalue()))
                if writer is not None:
                    writer.add_image(f"scores/{scorer}", rgba[..., :3], step, dataformats="HWC")
        if tensorboard is None:
            return
        metrics = {"hparam/accuracy": 100 * report.accuracy}
        for scorer in report.scorers:
            for column in report.columns:
                key = column if column == "Average" else column.replace("Average (", "average_").rstrip(")")
                for metric in ("fpr95", "auroc", "aupr_in", "aupr_out"):
                    metrics[f"hparam/{scorer}/{key}/{report.output_key(metric)}"] = report.percent(
                        scorer, column, metric
                    )
        params = {k: str(v) if isinstance(v, list | tuple | dict) else v for k, v in pl_module.hparams.items()
                  if k != "scorers"}  # fmt: skip
        for label, (name, values) in pl_module.scorer_specs.items():
            params[f"scorer/{label}"] = name
            params.update({f"scorer/{label}/{k}": v if isinstance(v, int | float | str | bool) else str(v)
                           for k, v in values.items()})  # fmt: skip
        params.update(id_dataset=report.id_name, ood_sets=",".join(report.ood_names))
        tensorboard.log_hyperparams(params, metrics)
        writer.flush()
