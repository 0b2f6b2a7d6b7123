"""``lightning-ood`` / ``python -m lightning_ood``: a LightningCLI that only wires the pieces together."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import ClassVar, NoReturn

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from lightning_ood import config_yaml
from lightning_ood.callbacks import FitOODStatistics, OODResultsTable, ScoreHistograms
from lightning_ood.checkpoints import SPECIAL_PATHS, AtomicCheckpointIO, read_checkpoint
from lightning_ood.config_yaml import shortened
from lightning_ood.data.base import OODDataModule
from lightning_ood.data.reproducible import check_seed
from lightning_ood.errors import ConfigError, LightningOODError, OutputError
from lightning_ood.io import describe_write_failure, is_write_failure
from lightning_ood.module import OODClassifier
from lightning_ood.run_folder import RunFolder, check_checkpoint_folder
from lightning_ood.trainer import OODTrainer

TRAINER_DEFAULTS = {
    "max_epochs": 100,
    "inference_mode": False,  # ODIN needs input gradients in the test pass
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # no placeholder hp_metric: TensorBoard's HParams keeps the first record, and the test writes the real one
        "init_args": {"save_dir": "logs", "name": "lightning_ood", "default_hp_metric": False},
    },
}


# Lightning's one-line descriptions cut ``test``'s docstring mid-sentence; these say what the commands do here.
SUBCOMMAND_HELP = {
    "fit": "Train the network (SGD, the configured schedule), then fit the OOD statistics on its training images.",
    "validate": "ID accuracy on held-out training images (--data.init_args.val_split).",
    "test": "One pass over the ID test set and every OOD set, scoring every configured detector (AUROC, FPR, tables).",
}


LINE_LIMIT = 500  # characters of one line of a parse error (a value given by the user can be huge)
MESSAGE_LIMIT = 2000  # characters of one error message


class ConciseParser(LightningArgumentParser):
    """A parse error prints one ``error:`` line and where to find the options, not the whole usage first."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse trying alternatives: it catches this
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        first = shortened(message.strip().splitlines()[0], LINE_LIMIT) if message.strip() else "invalid arguments"
        more = "\n".join(f"  {shortened(line, LINE_LIMIT)}" for line in message.strip().splitlines()[1:12])
        sys.stderr.write(f"error: {first}\n{more + chr(10) if more else ''}See `{prog} --help` for the options.\n")
        sys.exit(2)


class SaveConfigBeside(SaveConfigCallback):
    """LightningCLI's config file in the run's log folder, never over another's: ``config.yaml``, or beside an earlier
    run's (a resumed fit writing into its own folder, ``--overwrite_results``) as ``config-2.yaml``, ``config-3.yaml``,
    ... with a line saying so."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            folder = Path(trainer.log_dir)  # broadcast under DDP
            name = free_config_name(folder) if trainer.is_global_zero else None
            self.config_filename = trainer.strategy.broadcast(name)
            if self.config_filename != "config.yaml":
                rank_zero_info(
                    f"Config saved as {folder / self.config_filename}, beside the earlier run's config.yaml."
                )
        super().setup(trainer, pl_module, stage)


def free_config_name(folder: Path) -> str:
    """``config.yaml``, else the first of ``config-2.yaml``, ``config-3.yaml``, ... that ``folder`` does not hold."""
    name, number = "config.yaml", 1
    while (folder / name).exists():
        number += 1
        name = f"config-{number}.yaml"
    return name


class Interrupted(Exception):
    """A run stopped by SIGTERM (a scheduler's time limit or preemption) or Ctrl-C, with what it kept."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def fast_precision(subcommand: str | None, precision, accelerator) -> str | None:
    """The precision of the GPU fast path: ``bf16-mixed`` to train on a CUDA GPU that supports it when the user set
    none, else what the user set (``None``: Lightning's 32-bit). Evaluation scores in float32 whatever the precision
    (see :meth:`lightning_ood.module.OODClassifier.score_batch`)."""
    if precision is not None or not trains_on_cuda(subcommand, accelerator):
        return precision
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def trains_on_cuda(subcommand: str | None, accelerator) -> bool:
    return subcommand == "fit" and str(accelerator) in ("auto", "gpu", "cuda", "None") and torch.cuda.is_available()


def fast_benchmark(subcommand: str | None, benchmark, deterministic, accelerator) -> bool | None:
    """cuDNN's algorithm search (``trainer.benchmark``) when training on CUDA and the user set neither it nor
    ``deterministic``: CIFAR batches keep one shape, so the search runs once per layer; else what the user set."""
    if benchmark is not None or deterministic or not trains_on_cuda(subcommand, accelerator):
        return benchmark
    return True


class OODCLI(LightningCLI):
    """Adds an always-on ``checkpoint`` (ModelCheckpoint) group, links the data's class count to the model, the
    ``tune`` / ``sweep`` / ``import`` subcommands of :class:`OODTrainer`, and checks before any work:
    the checkpoint to load, the weights to evaluate, and the folders the run writes (:mod:`lightning_ood.run_folder`).
    ``predict`` is not offered: scoring images is what ``test`` does."""

    runs: ClassVar[list[RunFolder]] = []  # the run folders claimed in this process, released or abandoned by main()
    current: ClassVar[OODCLI | None] = None  # the CLI whose run is in progress (main() reports an interruption)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        ours = {"model", "datamodule"}
        lightning = {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}
        return {**lightning, "tune": ours, "sweep": ours, "import": ours}

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
        parser.add_argument(
            "--histograms", type=bool, default=True,
            help="Draw every scorer's score histograms after test (PNG in the run folder and in TensorBoard).",
        )  # fmt: skip
        parser.add_argument(
            "--overwrite_results", type=bool, default=False,
            help="Write into a log folder that already holds results of an earlier run (off: refuse).",
        )  # fmt: skip
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def _set_seed(self) -> None:
        """Lightning's seeding, after refusing a seed numpy does not take (it would end in a traceback)."""
        seed = self._get(self.config, "seed_everything")
        if not isinstance(seed, bool):
            check_seed("--seed_everything", seed, also=", true (a random seed) or false (no seeding)")
        super()._set_seed()

    def _parse_ckpt_path(self) -> None:
        """Lightning would overwrite the config with the hyperparameters stored in ``--ckpt_path`` (so a test would
        silently run the checkpoint's scorers instead of the configured ones). Here the config decides; a checkpoint
        for another backbone or class count is refused with a clear message when it is loaded."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        parsers = getattr(self, "_subcommand_parsers", {})
        # Our result table replaces Lightning's per-dataloader printout of every logged value.
        for name in ("test", "validate"):
            if name in parsers:
                parsers[name].set_defaults(verbose=False)
        for name in ("fit", "test", "validate"):  # never run code from a checkpoint (see lightning_ood.checkpoints)
            if name in parsers:
                parsers[name].set_defaults(weights_only=True)
        action = getattr(self.parser, "_subcommands_action", None)
        for choice in getattr(action, "_choices_actions", []):
            if choice.dest in SUBCOMMAND_HELP:
                choice.help = SUBCOMMAND_HELP[choice.dest]
                parsers[choice.dest].description = SUBCOMMAND_HELP[choice.dest]

    def instantiate_trainer(self, **kwargs):
        # Always on: statistics after fit, the result table and TensorBoard histograms after test; a rich progress
        # bar unless the user turned progress bars off; atomic checkpoint writes unless the user brings a CheckpointIO.
        figures = self._get(self.config_init, "histograms") is not False
        callbacks = [FitOODStatistics(), OODResultsTable(), ScoreHistograms(figures=figures)]
        if self._get(self.config_init, "trainer.logger") not in (False, None):  # the learning rate curve during fit
            callbacks.append(LearningRateMonitor("epoch"))
        if self._get(self.config_init, "trainer.enable_progress_bar") is not False:
            callbacks.insert(0, RichProgressBar())
        self.trainer_defaults["callbacks"] = callbacks
        plugins = self._get(self.config_init, "trainer.plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        configured = self._get(self.config_init, "trainer.precision")
        precision = fast_precision(self.subcommand, configured, self._get(self.config_init, "trainer.accelerator"))
        if precision is not None:
            kwargs["precision"] = precision
        benchmark = fast_benchmark(self.subcommand, self._get(self.config_init, "trainer.benchmark"),
                                   self._get(self.config_init, "trainer.deterministic"),
                                   self._get(self.config_init, "trainer.accelerator"))  # fmt: skip
        if benchmark is not None:
            kwargs["benchmark"] = benchmark
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    # ---------------------------------------------------------------- checks before the work
    def _ckpt_path(self) -> str | None:
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        return str(ckpt_path) if ckpt_path else None

    def _check_ckpt_path(self) -> None:
        """Read a given checkpoint once up front, so a missing, corrupt or unsafe file is one clear error; ``last`` is
        the checkpoint folder's ``last.ckpt``, and there must be one (a resume that silently trains from scratch is
        not a resume)."""
        OODCLI.current = self
        if self.config_init[self.subcommand].get("weights_only") is False:
            raise ConfigError(
                "--weights_only false would let the checkpoint's pickle run arbitrary code; it is not offered. "
                "Checkpoints load with weights_only=True (tensors, containers and plain values)."
            )
        ckpt_path = self._ckpt_path()
        if ckpt_path == "last":
            last = self._last_checkpoint()
            if last is None or not last.exists():
                where = f"in {last.parent}" if last is not None else "(no checkpoint folder is configured)"
                raise ConfigError(
                    f"--ckpt_path last: there is no last.ckpt {where}, so there is nothing to resume. Drop --ckpt_path "
                    f"to train from scratch, or give the checkpoint's path."
                )
            read_checkpoint(last)
        elif ckpt_path and ckpt_path not in SPECIAL_PATHS:
            read_checkpoint(ckpt_path)

    def _last_checkpoint(self) -> Path | None:
        checkpoint = self.trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            return None
        return Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"

    def _claim_run_folder(self, checkpoints: bool = False) -> None:
        """Check the folders this run writes and lock its log folder (see :mod:`lightning_ood.run_folder`)."""
        if not self.trainer.is_global_zero:
            return
        logger = self.trainer.logger
        folder = Path(logger.log_dir) if logger is not None and logger.log_dir else Path(self.trainer.default_root_dir)
        writable = []
        overwrite = bool(self.config_init[self.subcommand].get("overwrite_results"))
        checkpoint = self.trainer.checkpoint_callback
        if checkpoints and isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None:
            writable.append((Path(checkpoint.dirpath), "checkpoint.dirpath"))
            check_checkpoint_folder(Path(checkpoint.dirpath), self._ckpt_path(), overwrite)
            # asked to replace another run's checkpoints: replace them (Lightning would write last-v1.ckpt beside)
            checkpoint._enable_version_counter = checkpoint._enable_version_counter and not overwrite
        statistics_cache = self.model.hparams.get("statistics_cache")
        if statistics_cache:
            writable.append((Path(statistics_cache).expanduser(), "--model.statistics_cache"))
        resuming = self.subcommand == "fit" and self._ckpt_path() is not None
        self.runs.append(RunFolder.claim(folder, overwrite, tuple(writable), resuming))

    def _check_weights(self) -> None:
        """A test of random weights is refused unless asked for (``--model.weights random``)."""
        if self._ckpt_path() is None and self.model.hparams.weights is None:
            raise ConfigError(
                f"{self.subcommand} evaluates a trained network: pass --ckpt_path <checkpoint> or --model.weights "
                f"<published weights>; --model.weights random evaluates an untrained one on purpose."
            )

    def before_fit(self) -> None:
        self._check_ckpt_path()
        self._claim_run_folder(checkpoints=True)

    def before_test(self) -> None:
        self._check_ckpt_path()
        self._check_weights()
        self._claim_run_folder()

    def before_validate(self) -> None:
        self._check_ckpt_path()
        if not getattr(self.datamodule, "val_split", 0):
            raise ConfigError(
                "validate measures the accuracy on held-out training images: set --data.init_args.val_split N (those "
                "images are then left out of training and of the OOD statistics too)."
            )
        self._check_weights()
        self._claim_run_folder()

    def _before_command(self) -> None:
        self._check_ckpt_path()
        self._claim_run_folder()

    before_sweep = _before_command

    def before_tune(self) -> None:
        """The checks of every command, and the configuration its follow-up ``test`` runs with (see
        :func:`lightning_ood.commands.common.follow_up_command`)."""
        self._before_command()
        self.trainer.test_config = self._test_config()

    def before_import(self) -> None:
        """The checks of every command; the follow-up ``test`` evaluates the written checkpoint, which holds the
        weights (no published weights to convert again)."""
        self._before_command()
        output = str(Path(self.config_init["import"]["output"]).expanduser())
        self.trainer.test_config = self._test_config(ckpt_path=output, weights=None, weights_format=None)

    def _test_config(self, ckpt_path: str | None = None, **model: object) -> str | None:
        """This run's configuration as ``test`` reads it, as YAML: the model (with its weights), the data, the trainer,
        the checkpoint and the seed, without the command's own arguments; ``ckpt_path`` and ``model`` replace values.
        ``None`` when it cannot be written out (the command then suggests a ``-c <config>`` to fill in)."""
        config = self.config[self.subcommand].clone()
        own = set(self._subcommand_method_arguments[self.subcommand]) - set(self._subcommand_method_arguments["test"])
        for key in (*own, "config"):
            if key in config:
                del config[key]
        if ckpt_path is not None:
            config["ckpt_path"] = ckpt_path
        for key, value in model.items():
            config[f"model.{key}"] = value
        try:
            return self._subcommand_parsers["test"].dump(config, skip_unset=False)
        except Exception:  # a suggestion must never stop the run
            return None

    def _release(self) -> None:
        if self.trainer.received_sigterm:  # a SIGTERM after the last loop check (in the statistics pass, say)
            raise SIGTERMException()
        while self.runs:
            self.runs.pop().release()

    def after_validate(self) -> None:
        """The held-out accuracy, as ``test`` prints its table (Lightning's own printout is off: ``verbose``)."""
        accuracy = self.trainer.callback_metrics.get("val/acc")
        if self.trainer.is_global_zero and accuracy is not None:
            data = self.datamodule
            Console().print(
                f"Held-out accuracy on {data.id_name}: {100 * float(accuracy):.2f}% ({data.val_split} training images "
                f"held out by --data.init_args.val_split, seed {data.val_seed}).",
                highlight=False,
                soft_wrap=True,
            )
        self._release()

    after_fit = after_test = after_tune = after_sweep = after_import = _release


def user_error(exc: BaseException | None) -> LightningOODError | None:
    """The :class:`LightningOODError` behind ``exc``, if any (jsonargparse and Lightning may wrap it); a failed write
    anywhere (TensorBoard's event files, Lightning's own files) becomes an :class:`OutputError` naming the file."""
    seen = set()
    chain = []
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LightningOODError):
            return exc
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    for err in chain:
        if is_write_failure(err):
            target = getattr(err, "filename", None) or "an output file"
            return OutputError(describe_write_failure(Path(str(target)), err))
    return None


def clean_message(message: str) -> str:
    """The message itself, without the traceback that DataLoader workers embed when they re-raise an error."""
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def interruption(exc: BaseException) -> Interrupted | None:
    """What an interrupted run kept and how to resume it, when ``exc`` is a SIGTERM or Ctrl-C (Lightning turns
    Ctrl-C into ``sys.exit(1)`` after its graceful shutdown, and SIGTERM into a ``SystemExit`` with status 0)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, SIGTERMException) for e in chain):
        what, status = "SIGTERM", 128 + signal.SIGTERM
    elif any(isinstance(e, KeyboardInterrupt) for e in chain):
        what, status = "Ctrl-C (SIGINT)", 128 + signal.SIGINT
    else:
        return None
    cli = OODCLI.current
    trainer = getattr(cli, "trainer", None)
    if cli is None or trainer is None:
        return Interrupted(f"{what} before the run started; nothing was written.", status)
    kept = []
    if trainer.log_dir and Path(trainer.log_dir).is_dir():
        kept.append(f"the logs in {trainer.log_dir}")
    last = cli._last_checkpoint() if cli.subcommand == "fit" else None
    if last is not None and last.exists():
        epoch = read_checkpoint(last).get("epoch")
        kept.append(f"{last} (end of epoch {epoch})")
    message = f"{cli.subcommand} stopped by {what} in epoch {trainer.current_epoch} (step {trainer.global_step})."
    message += f" Kept: {'; '.join(kept)}." if kept else " Nothing was saved."
    if cli.subcommand == "fit" and last is not None and last.exists():
        message += (
            " Resume with the same command and --ckpt_path last: training continues at the next epoch and step, "
            "logged into a new version folder beside this one (TensorBoard shows both, steps continuing); pass "
            "--trainer.logger.init_args.version to write into this one instead."
        )
    return Interrupted(message, status)


def main(args=None) -> None:
    """Entry point; user errors print one line and exit with status 2, an interrupted run says what it kept and exits
    with 128 + the signal (143 for SIGTERM, 130 for Ctrl-C). ``report`` (no model, no data) is dispatched before the
    LightningCLI is built."""
    argv = list(sys.argv[1:] if args is None else args)
    OODCLI.current = None
    try:
        config_yaml.install()
        config_yaml.check_config_files(argv)
        if argv[:1] == ["report"]:
            from lightning_ood.commands.report import report

            report(argv[1:])
            return
        OODCLI(
            OODClassifier,
            OODDataModule,
            trainer_class=OODTrainer,
            parser_class=ConciseParser,
            subclass_mode_data=True,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            seed_everything_default=42,
            load_from_checkpoint_support=False,  # plain hyperparameters in checkpoints (see _parse_ckpt_path)
            save_config_callback=SaveConfigBeside,
            save_config_kwargs={"overwrite": True},  # the name is a free one (SaveConfigBeside)
            parser_kwargs={
                "epilog": "Also: lightning-ood report RUN_DIR... [--output DIR] aggregates runs (seeds, checkpoints) "
                "into mean ± std tables (markdown, CSV, LaTeX)."
            },
            args=args,
        )
    except BaseException as exc:
        while OODCLI.runs:  # release the lock; remove only folders this run left truly empty
            OODCLI.runs.pop().abandon()
        stopped = interruption(exc)
        if stopped is not None:
            Console(stderr=True).print(f"[bold yellow]interrupted:[/] {stopped}", highlight=False, soft_wrap=True)
            sys.exit(stopped.status)
        err = user_error(exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        message = shortened(clean_message(str(err)), MESSAGE_LIMIT)
        Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)
    finally:
        OODCLI.current = None


if __name__ == "__main__":
    main()
