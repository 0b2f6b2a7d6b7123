"""Checkpoint reading with clear errors, and atomic checkpoint writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_ood.errors import CheckpointError
from lightning_ood.io import atomic_write

SPECIAL_PATHS = {"last", "best", "hpc", "registry"}  # resolved by Lightning itself


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU, or raise a :class:`CheckpointError` saying what is wrong with it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, pickle errors, not a torch file at all
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); it is "
            f"truncated, corrupt or not a PyTorch checkpoint."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no 'state_dict').")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpointing, written to a temporary file and renamed into place: a crash
    mid-write never leaves a truncated checkpoint behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
