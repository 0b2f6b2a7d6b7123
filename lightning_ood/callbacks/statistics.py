"""Fit the OOD statistics (prototypes, covariance, activation percentiles, ...) on the training set after ``fit``.

The statistics pass is the engine's (:func:`lightning_ood.fitting.compute_feature_statistics`); this callback runs it
when training ends and writes a checkpoint carrying the statistics afterwards, because ModelCheckpoint saves before
``on_train_end``.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.engine import DEFAULT_MAX_ACTIVATIONS
from lightning_ood.fitting import compute_feature_statistics

__all__ = ["FitOODStatistics", "compute_feature_statistics"]


class FitOODStatistics(Callback):
    """After training, fit the OOD statistics on the training set and save them in ``last.ckpt``.

    Args:
        max_activations: activation values kept in memory for the exact ReAct percentiles; above it, one image in
            ``ceil(N * L / max_activations)`` is used (by dataset index, so the result does not depend on DDP).
        save_checkpoint: write ``<checkpoint dir>/last.ckpt`` again once the statistics exist.
    """

    def __init__(self, max_activations: int = DEFAULT_MAX_ACTIVATIONS, save_checkpoint: bool = True) -> None:
        self.max_activations = max_activations
        self.save_checkpoint = save_checkpoint

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.ood_statistics = None  # the weights are about to change

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.fast_path.leave()  # statistics of the network as the test runs it
        datamodule = trainer.datamodule
        pl_module.ood_statistics = compute_feature_statistics(
            pl_module.fit_inputs(), datamodule.statistics_dataloader(), trainer, self.max_activations,
            progress=trainer.progress_bar_callback is not None, described_as=datamodule.describe_statistics_images(),
        )  # fmt: skip
        if self.save_checkpoint and not trainer.fast_dev_run:
            checkpoint = trainer.checkpoint_callback
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None:
                # this run's last checkpoint, under the name Lightning gave it (never another run's file)
                last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
                path = Path(checkpoint.last_model_path) if checkpoint.last_model_path else last
                # weights_only=False: the full state, as ModelCheckpoint saves it (Lightning otherwise notes after every
                # fit that it is "defaulting to False", which reads like an unsafe load; nothing is loaded here)
                trainer.save_checkpoint(path, weights_only=False)
                checkpoint.last_model_path = str(path)
                rank_zero_info(f"Saved {path} with the OOD statistics.")
