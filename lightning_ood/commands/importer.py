"""``lightning-ood import``: convert published weights into a Lightning checkpoint with the OOD statistics fitted on
the training images and the input normalisation they expect, so later runs start in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import lightning
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_ood.commands.common import (
    check_output_file,
    ensure_statistics,
    follow_up_command,
    load_model,
    run_folder,
)
from lightning_ood.data.base import OODDataModule
from lightning_ood.errors import ConfigError
from lightning_ood.io import atomic_write
from lightning_ood.module import OODClassifier


def import_weights(
    self: Trainer,
    model: OODClassifier,
    datamodule: OODDataModule,
    output: str,
    ckpt_path: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a Lightning checkpoint of ``model.weights`` (converted from its published format) with the OOD
    statistics fitted on the training images and the input normalisation the weights expect.

    ``lightning-ood test -c CONFIG --ckpt_path OUTPUT`` then evaluates it without converting or fitting again.

    Args:
        model: the model (from the config); ``model.weights`` names the published file.
        datamodule: the data (from the config); its training images give the OOD statistics.
        output: the checkpoint to write (``.ckpt``).
        ckpt_path: a Lightning checkpoint to take the weights from instead of ``model.weights``.
        overwrite: replace ``output`` when it exists.

    Returns:
        ``{"checkpoint": path, "seconds": time}``.
    """
    start = time.perf_counter()
    if model.hparams.weights is None and ckpt_path is None:
        raise ConfigError("import converts published weights: pass --model.weights <file>.")
    check_output_file(output)
    target = Path(output).expanduser()
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite true to replace it.")
    load_model(self, model, datamodule, ckpt_path)
    ensure_statistics(model, datamodule)
    checkpoint = {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "imported_from": str(model.hparams.weights or ckpt_path),
    }
    model.on_save_checkpoint(checkpoint)
    atomic_write(target, lambda f: torch.save(checkpoint, f))
    elapsed = time.perf_counter() - start
    command = follow_up_command(self, run_folder(self), fallback=["--ckpt_path", str(target)])
    rank_zero_info(
        f"Wrote {target}: the weights of {checkpoint['imported_from']} with OOD statistics on "
        f"{model.ood_statistics.num_samples} training images and the normalisation "
        f"{model.input_normalization.describe()} ({elapsed:.1f}s). Evaluate it with: {command}"
    )
    return {"checkpoint": str(target), "seconds": elapsed}
