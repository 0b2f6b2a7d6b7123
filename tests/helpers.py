"""Helpers the tests load into CLI runs (``--trainer.callbacks tests.helpers.KillAtStep``)."""

import os
import signal

from lightning.pytorch import Callback

from lightning_ood.data import CIFARDataModule
from lightning_ood.data.tensors import RawBatch


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
