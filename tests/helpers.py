"""Helpers the tests load into CLI runs (``--trainer.callbacks tests.helpers.KillAtStep``)."""

import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    """SIGKILL the training process right after optimisation step ``step``: a hard crash mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
