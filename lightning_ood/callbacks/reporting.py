"""Reporting after the OOD test pass: the result table (console, markdown, CSV) and TensorBoard score histograms.

Both read what the module measured (``pl_module.ood_report``, ``pl_module.gathered_scores()``); scores are gathered
from every rank first, and only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console
from torch import Tensor


def run_folder(trainer: Trainer) -> Path:
    """The run's log folder (``logs/<name>/version_N``), or the default root when there is no logger. A collective
    under DDP: call it on every rank."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class OODResultsTable(Callback):
    """Print the result table with rich and write it as ``ood_results.md`` / ``ood_results.csv`` in the run folder."""

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
        Console().print(report.rich_table())
        markdown, csv, json = report.write(folder)
        rank_zero_info(f"OOD results written to {markdown}, {csv.name} and {json.name}")


def overlay_figure(title: str, scores: dict[str, Tensor], bins: int = 60):
    """One histogram per test set on shared bins, ID first (density, so sets of different sizes compare)."""
    finite = {k: v[torch.isfinite(v)].float() for k, v in scores.items()}
    values = torch.cat(list(finite.values()))
    lo, hi = (float(values.min()), float(values.max())) if values.numel() else (0.0, 1.0)
    if hi - lo < 1e-9:  # constant scores (an untrained or degenerate model): centre one bin on them
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1).numpy()
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for i, (name, v) in enumerate(finite.items()):
        axis.hist(v.numpy(), bins=edges, density=True, alpha=0.55 if i == 0 else 0.4, label=name + (" (ID)" * (i == 0)))
    axis.set_title(title)
    axis.set_xlabel("score (higher = more in-distribution)")
    axis.set_ylabel("density")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


class ScoreHistograms(Callback):
    """TensorBoard: per scorer, a histogram of the ID scores and one per OOD set, an overlaid figure, and the final
    metrics as hparams.

    Args:
        bins: histogram bins.
        figures: also log the overlaid matplotlib figure per scorer.
    """

    def __init__(self, bins: int = 100, figures: bool = True) -> None:
        self.bins = bins
        self.figures = figures

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = getattr(pl_module, "ood_report", None)
        if report is None or not report.metrics:
            return
        scores = pl_module.gathered_scores()  # every rank takes part in the gather
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is None or not trainer.is_global_zero:
            return
        writer = tensorboard.experiment
        step = trainer.global_step
        for scorer, per_set in scores.items():
            for dataset, values in per_set.items():
                values = values[torch.isfinite(values)]
                if values.numel():
                    writer.add_histogram(f"scores/{scorer}/{dataset}", values, step, bins=self.bins)
            if self.figures:
                writer.add_figure(f"score_histograms/{scorer}", overlay_figure(scorer, per_set), step, close=True)
        metrics = {"hparam/accuracy": report.accuracy}
        for scorer in report.scorers:
            average = report.average(scorer)
            metrics[f"hparam/{scorer}/{report.fpr_label.lower()}"] = average["fpr95"]
            metrics[f"hparam/{scorer}/auroc"] = average["auroc"]
        params = {k: str(v) if isinstance(v, list | tuple | dict) else v for k, v in pl_module.hparams.items()}
        tensorboard.log_hyperparams({**params, "id_dataset": report.id_name, "ood_sets": ",".join(report.ood_names)},
                                    metrics)  # fmt: skip
        writer.flush()
