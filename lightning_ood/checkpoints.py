"""Checkpoint reading with clear errors, and atomic checkpoint writing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_ood.errors import CheckpointError
from lightning_ood.io import atomic_write

SPECIAL_PATHS = {"last", "best", "hpc", "registry"}  # resolved by Lightning itself


def load_file(path: Path, what: str, kind: str, weights_only: bool) -> Any:
    """``torch.load`` on the CPU; a missing or unreadable file becomes one :class:`CheckpointError` naming ``what``
    (the file's role) and ``kind`` (what it should have been)."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # truncated zip, pickle errors, not a torch file at all
        raise CheckpointError(
            f"{what} {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); it is "
            f"truncated, corrupt or not a PyTorch {kind}."
        ) from err


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU, or raise a :class:`CheckpointError` saying what is wrong with it."""
    path = Path(path).expanduser()
    checkpoint = load_file(path, "Checkpoint", "checkpoint", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no 'state_dict').")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpointing, written to a temporary file and renamed into place: a crash
    mid-write never leaves a truncated checkpoint behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
