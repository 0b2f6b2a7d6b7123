"""``lightning-ood`` / ``python -m lightning_ood``: a LightningCLI that only wires the pieces together."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from lightning_ood.callbacks import FitOODStatistics, OODResultsTable, ScoreHistograms
from lightning_ood.data.base import OODDataModule
from lightning_ood.errors import LightningOODError
from lightning_ood.module import OODClassifier

TRAINER_DEFAULTS = {
    "max_epochs": 100,
    "inference_mode": False,  # ODIN needs input gradients in the test pass
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "lightning_ood"},
    },
}


class OODCLI(LightningCLI):
    """Adds an always-on ``checkpoint`` (ModelCheckpoint) group and links the data's class count to the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "checkpoints/lightning_ood",
                "checkpoint.filename": "epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
            }
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # Our result table replaces Lightning's per-dataloader printout of every logged value.
        for name in ("test", "validate"):
            if name in getattr(self, "_subcommand_parsers", {}):
                self._subcommand_parsers[name].set_defaults(verbose=False)

    def instantiate_trainer(self, **kwargs):
        # Always on: statistics after fit, the result table and TensorBoard histograms after test; a rich progress
        # bar unless the user turned progress bars off.
        callbacks = [FitOODStatistics(), OODResultsTable(), ScoreHistograms()]
        if self._get(self.config_init, "trainer.enable_progress_bar") is not False:
            callbacks.insert(0, RichProgressBar())
        self.trainer_defaults["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def user_error(exc: BaseException | None) -> LightningOODError | None:
    """The :class:`LightningOODError` behind ``exc``, if any (jsonargparse and Lightning may wrap it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LightningOODError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(args=None) -> None:
    """Entry point; user errors print one line and exit with status 2."""
    try:
        OODCLI(
            OODClassifier,
            OODDataModule,
            subclass_mode_data=True,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
