"""A callback that SIGKILLs its own process, for the kill-and-resume test (never used outside tests)."""

import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    """Kills the process when step `step` starts, after the checkpoint of the step before was written."""

    def __init__(self, step: int = 4) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
