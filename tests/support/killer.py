"""Callbacks that kill or signal their own process, for the kill-and-resume tests (never used outside tests)."""

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


class SignalAtStep(Callback):
    """Sends the process `signal` (a name: SIGTERM, SIGINT) when step `step` starts, as a scheduler
    or a Ctrl+C would; the step then runs to its end."""

    def __init__(self, step: int = 3, signal: str = "SIGTERM") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))
