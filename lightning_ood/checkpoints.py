"""Checkpoint reading with clear errors, and atomic checkpoint writing.

Every file this project reads back with ``torch.load`` (``--ckpt_path``, ``--model.weights``, the caches, Lightning's
own restore through :class:`AtomicCheckpointIO`) is loaded with ``weights_only=True``: tensors, containers and plain
values only. A pickle that asks for anything else (a ``__reduce__`` calling ``os.system``, a class of someone's code) is
refused with one error naming the file and the globals it wanted, before any of it runs. This project writes nothing
else into its checkpoints, so no allowlist is needed; there is deliberately no switch that runs code from a file.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor

from lightning_ood.errors import CheckpointError
from lightning_ood.io import atomic_write

SPECIAL_PATHS = {"last", "best", "hpc", "registry"}  # resolved by Lightning itself


def unsafe_globals(path: str | Path, err: BaseException) -> list[str]:
    """The globals (functions, classes) a pickle refused by ``weights_only`` wanted, read from its opcodes without
    running any of them (or from torch's message for files it cannot scan)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) format: torch's message names the first one
        found = []
    return found or re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]


def refused_globals(path: str | Path, err: BaseException) -> list[str]:
    """The globals ``torch.load(weights_only=True)`` refused to call, or ``[]`` when ``err`` is something else (a
    truncated file, bytes that are no pickle at all: torch reports those as the same ``UnpicklingError``)."""
    if not (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)):
        return []
    return unsafe_globals(path, err)


def reason(err: BaseException) -> str:
    """The line of a ``torch.load`` error that says what is wrong (torch's weights-only errors bury it in prose)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for at, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            detail = line.removeprefix("WeightsUnpickler error:").strip()
            return detail or (lines[at + 1] if at + 1 < len(lines) else line)
    return lines[0] if lines else type(err).__name__


def untrusted_pickle(path: str | Path, what: str, wanted: list[str]) -> CheckpointError:
    """The error for a file whose pickle calls ``wanted`` (functions, classes) beyond tensors and plain containers."""
    named = ", ".join(wanted[:5]) + (f" and {len(wanted) - 5} more" if len(wanted) > 5 else "")
    return CheckpointError(
        f"{what} {path} was not loaded: its pickle calls {named}, which could run arbitrary code (only tensors, "
        f"containers and plain values are read). If you trust the file, re-save its state dict with torch.save in "
        f"a Python session and pass that file."
    )


def load_file(path: Path, what: str, kind: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; a missing, unreadable or unsafe file becomes one
    :class:`CheckpointError` naming ``what`` (the file's role) and ``kind`` (what it should have been)."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file at all, or a pickle asking for code
        wanted = refused_globals(path, err)
        if wanted:
            raise untrusted_pickle(path, what, wanted) from err
        raise CheckpointError(
            f"{what} {path} cannot be read ({type(err).__name__}: {reason(err)[:200]}); it is truncated, corrupt or "
            f"not a PyTorch {kind}."
        ) from err


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A weights file's state dict (:func:`load_file`), unwrapped from a ``state_dict`` or ``model`` entry (Lightning,
    torchvision's training scripts), or a :class:`CheckpointError` when it holds anything but names and tensors."""
    loaded = load_file(path, "Weights file", "state dict")
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(f"Weights file {path} does not hold a state dict (a mapping of names to tensors).")
    return dict(loaded)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU, or raise a :class:`CheckpointError` saying what is wrong with it."""
    path = Path(path).expanduser()
    checkpoint = load_file(path, "Checkpoint", "checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no 'state_dict').")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpointing, written to a temporary file and renamed into place: a crash
    mid-write never leaves a truncated checkpoint behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's restore (``--ckpt_path``, SLURM's ``hpc`` checkpoints): always ``weights_only=True``,
        whatever the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` asks."""
        try:
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            wanted = refused_globals(path, err)
            if wanted:
                raise untrusted_pickle(path, "Checkpoint", wanted) from err
            raise
