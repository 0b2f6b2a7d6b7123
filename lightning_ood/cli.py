"""``lightning-ood`` / ``python -m lightning_ood``: a LightningCLI that only wires the pieces together."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from lightning_ood.callbacks import FitOODStatistics, OODResultsTable, ScoreHistograms
from lightning_ood.checkpoints import SPECIAL_PATHS, AtomicCheckpointIO, read_checkpoint
from lightning_ood.data.base import OODDataModule
from lightning_ood.errors import LightningOODError
from lightning_ood.module import OODClassifier
from lightning_ood.trainer import OODTrainer

TRAINER_DEFAULTS = {
    "max_epochs": 100,
    "inference_mode": False,  # ODIN needs input gradients in the test pass
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "lightning_ood"},
    },
}


class OODCLI(LightningCLI):
    """Adds an always-on ``checkpoint`` (ModelCheckpoint) group, links the data's class count to the model, and the
    ``tune`` / ``sweep`` / ``normratio`` subcommands of :class:`OODTrainer`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        ours = {"model", "datamodule"}
        return {**LightningCLI.subcommands(), "tune": ours, "sweep": ours, "normratio": ours, "import": ours}

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

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the config with the hyperparameters stored in ``--ckpt_path`` (so a test would
        silently run the checkpoint's scorers instead of the configured ones). Here the config decides; a checkpoint
        for another backbone or class count is refused with a clear message when it is loaded."""

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
        self.trainer_defaults.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def _check_ckpt_path(self) -> None:
        """Read a given checkpoint once up front, so a missing or corrupt file is one clear error."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in SPECIAL_PATHS:
            read_checkpoint(ckpt_path)

    before_fit = before_validate = before_test = before_predict = _check_ckpt_path


def user_error(exc: BaseException | None) -> LightningOODError | None:
    """The :class:`LightningOODError` behind ``exc``, if any (jsonargparse and Lightning may wrap it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LightningOODError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def clean_message(message: str) -> str:
    """The message itself, without the traceback that DataLoader workers embed when they re-raise an error."""
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def main(args=None) -> None:
    """Entry point; user errors print one line and exit with status 2."""
    try:
        OODCLI(
            OODClassifier,
            OODDataModule,
            trainer_class=OODTrainer,
            subclass_mode_data=True,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            seed_everything_default=42,
            load_from_checkpoint_support=False,  # plain hyperparameters in checkpoints (see _parse_ckpt_path)
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {clean_message(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
