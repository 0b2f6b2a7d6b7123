"""Callbacks: OOD statistics after training, result tables and TensorBoard score histograms."""

from lightning_ood.callbacks.reporting import OODResultsTable, ScoreHistograms
from lightning_ood.callbacks.statistics import FitOODStatistics, compute_feature_statistics

__all__ = ["FitOODStatistics", "OODResultsTable", "ScoreHistograms", "compute_feature_statistics"]
