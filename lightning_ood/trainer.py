"""``OODTrainer``: Lightning's Trainer plus the OOD commands, which the CLI exposes as subcommands. Each command lives
in a module of its own (:mod:`lightning_ood.commands`); the Trainer only carries them as methods, so that
LightningCLI builds their arguments from the signatures:

- ``tune``: choose a scorer's hyperparameters the way its class declares: a grid on validation images (the paper's
  p and lambda on Gaussian noise), or a setting the scorer chooses itself (FeatureNorm's block, by NormRatio);
- ``sweep``: FPR95/AUROC over the hyperparameters scorers declare sweeps of, for every OOD set (Figures 6, 7);
- ``import``: convert published weights into a Lightning checkpoint with the OOD statistics;
- ``report``: aggregate result folders (seeds, checkpoints) into mean +- std tables.
"""

from __future__ import annotations

from lightning.pytorch import Trainer

from lightning_ood.commands.importer import import_weights
from lightning_ood.commands.sweep import sweep
from lightning_ood.commands.tune import tune


class OODTrainer(Trainer):
    """A Trainer with the ``tune``, ``sweep`` and ``import`` commands (see the module docstring)."""

    tune = tune
    sweep = sweep


setattr(OODTrainer, "import", import_weights)  # `import` is a Python keyword: the CLI subcommand is this method
