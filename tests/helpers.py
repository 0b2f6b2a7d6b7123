"""Helpers the tests load into CLI runs (``--trainer.callbacks tests.helpers.KillAtStep``), run the CLI with
(``run_cli``, ``cli_error``, ``args``) and build toy data with (``random_problem``, ``batches``, ``case``)."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar
from unittest.mock import patch

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_ood.cli import main
from lightning_ood.data import CIFARDataModule
from lightning_ood.data.tensors import RawBatch
from tests.references import ref_class_means

# ----------------------------------------------------------------------------------------------- loaded into CLI runs


class KillAtStep(Callback):
    """SIGKILL the training process right after optimisation step ``step``: a hard crash mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringCheckpointWrite(Callback):
    """In epoch ``epoch``, the write of ``last.ckpt`` sends half of its bytes to the file, then the process is
    SIGKILLed: a crash in the middle of writing ``last.ckpt``, at the IO layer the CLI's Trainer uses."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        import io

        import torch

        real_save = torch.save

        def dying_save(obj, f, *args, **kwargs):
            target = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else ""
            if "/.last.ckpt." not in target:  # only the write of last.ckpt dies
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save


class RecordCheckpointIO(Callback):
    """Write the class of the Trainer's checkpoint IO plugin to ``path`` when fit starts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module) -> None:
        io = trainer.strategy.checkpoint_io
        with open(self.path, "w") as f:
            f.write(f"{type(io).__module__}.{type(io).__qualname__}")


class RecordingCIFARDataModule(CIFARDataModule):
    """The CIFAR DataModule, writing the dataset indices and epochs of every raw training batch it augments to
    ``<record>/rank<R>.txt`` (one ``epoch index`` line per image): what each DDP rank trained on."""

    def __init__(self, record: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = record

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, RawBatch):
            rank = self.trainer.global_rank if self.trainer is not None else 0
            with open(os.path.join(self.record, f"rank{rank}.txt"), "a") as f:
                for epoch, index in zip(batch.epochs.tolist(), batch.indices.tolist(), strict=True):
                    f.write(f"{epoch} {index}\n")
        return super().on_after_batch_transfer(batch, dataloader_idx)


class SignalAtStep(Callback):
    """Send ``signal`` (``SIGTERM``: a scheduler's time limit or preemption; ``SIGINT``: Ctrl-C) to the training
    process right after optimisation step ``step``, as the outside world would."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


# What makes the host wait for a CUDA device's queued work when a tensor lives there: reading a value (item, tolist,
# bool/int/float, numpy), an op whose output size depends on the values (unique, nonzero, masked_select, a boolean
# mask index), or a tensor built from Python values on the device. On a CPU nothing waits, so the tests count these
# calls instead.
HOST_READS = frozenset(
    {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "unique", "unique_consecutive",
     "nonzero", "masked_select", "argwhere", "bincount", "repeat_interleave"}
)  # fmt: skip


class HostReadMode(TorchFunctionMode):
    """Counts the tensor operations that would synchronise the host with a CUDA device (``HOST_READS``, boolean mask
    indexing), with where each came from; those of the data loader's machinery are left out (its sampler and worker
    seeds are CPU tensors on every machine)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        mask_index = name == "__getitem__" and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if isinstance(args[1], tuple) else (args[1],))
        )
        # a tensor built from Python values on a device is copied there synchronously (the host waits for the copy)
        upload = name in ("tensor", "as_tensor") and (kwargs or {}).get("device") is not None
        if name in HOST_READS or mask_index or upload:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/overrides" not in f.filename]
            if any("torch/utils/data" in f.filename for f in frames):  # the loader's own seeds and sampler: host
                return func(*args, **(kwargs or {}))  # tensors on every machine
            self.reads.append(f"{name} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-6:]))
        return func(*args, **(kwargs or {}))


class HostReadWindows(Callback):
    """Counts :class:`HostReadMode`'s reads per batch of one loop: from the end of the previous batch (so loading,
    transfer and augmentation count) to the end of this one (so the progress bar's and the logger's reads count)."""

    def __init__(self) -> None:
        type(self).batches = []
        self.mode: HostReadMode | None = None

    def open(self) -> None:
        self.mode = HostReadMode()
        self.mode.__enter__()

    def record(self, key: tuple) -> None:
        if self.mode is not None:
            type(self).batches.append((*key, self.mode.reads))
            self.mode.reads = []

    def close(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


class CountHostReads(HostReadWindows):
    """Training batches: ``CountHostReads.batches`` holds ``(batch_idx, last batch of its epoch, reads)``."""

    batches: ClassVar[list[tuple[int, bool, list[str]]]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.open()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record((batch_idx, batch_idx + 1 == trainer.num_training_batches))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.close()


class CountTestHostReads(HostReadWindows):
    """Test batches: ``CountTestHostReads.batches`` holds ``(dataloader_idx, batch_idx, reads)``."""

    batches: ClassVar[list[tuple[int, int, list[str]]]] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.open()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.record((dataloader_idx, batch_idx))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.close()


# Settings of the scorers whose defaults need more training images than a test's tiny data sets hold: their fits
# refuse, with an error, k neighbours beyond the bank, mixture components beyond its features, and principal axes the
# features do not span.
SMALL_DATA_SETTINGS = {
    "knn": {"k": 5},
    "nnguide": {"k": 5, "fraction": 0.25},
    "gmm": {"components": 4, "dim": 10},
}
# A cheaper setting of the one costly scorer, where a test checks something its magnitude search does not change
# (shapes, dtypes, devices, float32 ties): one magnitude instead of the authors' seven.
QUICK_SETTINGS = {**SMALL_DATA_SETTINGS, "mahalanobis_paper": {"magnitudes": [0.0]}}


def scorer_mapping(names, settings: dict | None = None) -> dict:
    """``{name: {scorer: name, **settings}}`` of ``names``, with ``settings`` (default :data:`SMALL_DATA_SETTINGS`)
    where a name has them."""
    settings = SMALL_DATA_SETTINGS if settings is None else settings
    return {name: {"scorer": name, **settings.get(name, {})} for name in names}


# ---------------------------------------------------------------------------------------------------- running the CLI


def run_cli(*args: str) -> None:
    with patch.object(sys, "argv", ["lightning-ood"]):
        main(list(args))


def quiet(tmp_path: Path) -> list[str]:
    """Arguments that keep a CLI run's files inside the test's folder."""
    return [
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
    ]


def cli_error(capsys, *args: str) -> str:
    """Run the CLI expecting a user error: exit status 2 and a one-line message on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def args(logs: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", "0",
            "--model.backbone", "resnet20", "--model.scorers", "[msp, energy, fmls]",
            "--trainer.enable_progress_bar", "false", "--data.ood", '[{"name": "gaussian_noise", "size": 10}]',
            "--trainer.logger.init_args.save_dir", str(logs), *extra]  # fmt: skip


def one_line(err: str) -> None:
    assert err.startswith("error: ") and "Traceback" not in err


def nothing_left(logs: Path) -> None:
    """A run refused before it started leaves no log folder, no results and no temporary files behind."""
    assert not logs.exists() or not [p for p in logs.rglob("*") if p.is_file()], sorted(logs.rglob("*"))


def case_args(tmp, data, *extra, workers="0"):
    return ["--data", "CIFARDataModule", "--data.root", str(data), "--data.num_workers", workers,
            "--model.backbone", "resnet20", "--model.scorers", "[msp, fmls]", "--trainer.enable_progress_bar", "false",
            "--data.ood", '[{"name": "gaussian_noise", "size": 10}]',
            "--trainer.logger.init_args.save_dir", str(tmp / "logs"), *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- toy data


def linear_head(W: np.ndarray, b: np.ndarray) -> nn.Linear:
    head = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head


def make_problem(train, labels, test, W, b) -> SimpleNamespace:
    """Float32 tensors for the scorers, float64 numpy copies of the SAME values for the references."""
    t = SimpleNamespace(
        train=torch.as_tensor(np.asarray(train), dtype=torch.float32),
        labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
        test=torch.as_tensor(np.asarray(test), dtype=torch.float32),
        head=linear_head(np.asarray(W), np.asarray(b)),
    )
    t.logits = t.head(t.test).detach()
    t.num_classes = t.head.out_features
    t.train64 = t.train.double().numpy()
    t.test64 = t.test.double().numpy()
    t.labels64 = t.labels.numpy()
    t.W = t.head.weight.detach().double().numpy()
    t.b = t.head.bias.detach().double().numpy()
    t.prototypes = ref_class_means(t.train64, t.labels64, t.num_classes)
    return t


def random_problem(seed: int = 0, num_classes: int = 4, dim: int = 10, n_train: int = 48, n_test: int = 24):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.arange(num_classes), rng.integers(0, num_classes, n_train - num_classes)]
    centers = rng.gamma(2.0, 0.5, (num_classes, dim))
    train = np.maximum(centers[labels] + rng.normal(0, 0.4, (n_train, dim)), 0)
    test = np.maximum(centers[rng.integers(0, num_classes, n_test)] + rng.normal(0, 0.8, (n_test, dim)), 0)
    test[: n_test // 4] *= 3  # abnormally large activations
    test[-1] = 0  # a dead feature vector (possible after the ReLU): cosine 0
    W = rng.normal(0, 1, (num_classes, dim))
    b = rng.normal(0, 0.5, num_classes)
    return make_problem(train, labels, test, W, b)


def case(seed: int, n_id: int, n_ood: int, decimals: int | None):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)]
    if decimals is not None:
        scores = np.round(scores, decimals)
    return np.r_[np.ones(n_id, dtype=np.int64), np.zeros(n_ood, dtype=np.int64)], scores


SETS = ["id", "far", "near"]


def batches(seed: int = 0):
    """``(set index, logits, labels, scores, indices)`` of 3 sets of 13, 9 and 11 images in uneven batches."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for s, (n, shift) in enumerate(zip((13, 9, 11), (0.0, -2.0, -0.5), strict=True)):
        logits = torch.randn(n, 4, generator=generator) * 3
        labels = torch.randint(0, 4, (n,), generator=generator)
        scores = {"a": torch.randn(n, generator=generator) + shift, "b": logits.logsumexp(1).double()}
        for start in range(0, n, 4):
            part = slice(start, start + 4)
            out.append((s, logits[part], labels[part], {k: v[part] for k, v in scores.items()}, torch.arange(n)[part]))
    return out
