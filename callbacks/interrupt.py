"""Stopping on SIGINT/SIGTERM without losing the steps done: a checkpoint at the current step, then stop.

A scheduler's SIGTERM or a user's Ctrl+C asks the run to stop (`request_stop`, called by the signal
handlers the app installs around `trainer.fit`). The step in progress finishes; at its end the
checkpoint of that step is written as `last.ckpt` (through the Trainer, so `AtomicCheckpointIO`'s
temp-file-then-rename and finite-only write apply) unless the newest checkpoint already holds that
step, the metrics are flushed, and `Interrupted` is raised with where the checkpoint is. A second
request (Ctrl+C twice: a long step should not make the user wait) raises `Interrupted` at once,
keeping the newest checkpoint written so far.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback

from pmetal.errors import Interrupted

log = logging.getLogger("pmetal")


def checkpoint_dir(trainer) -> Path:
    callback = getattr(trainer, "checkpoint_callback", None)
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


class InterruptCheckpoint(Callback):
    """Writes the checkpoint of the current step and stops training after a stop request (see module)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.saved_step: int | None = None  # the global step of the newest checkpoint of this run
        self._trainer = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.signum, self._trainer = None, trainer

    def on_train_start(self, trainer, pl_module) -> None:
        self.saved_step = trainer.global_step  # 0, or the step of the checkpoint resumed from

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_step = trainer.global_step

    def request_stop(self, signum: int) -> None:
        """Stop at the end of the current step; a second request stops at once."""
        if self.signum is not None:
            raise self.interrupted(signum, saved=False)
        self.signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signum is None:
            return
        saved = trainer.global_step > (self.saved_step or 0)
        if saved:
            trainer.save_checkpoint(checkpoint_dir(trainer) / "last.ckpt")
            for logger in trainer.loggers:
                logger.save()
        raise self.interrupted(self.signum, saved=saved)

    def interrupted(self, signum: int, *, saved: bool) -> Interrupted:
        """The `Interrupted` to raise: the step, the checkpoint to resume from (written now when `saved`)."""
        from pmetal.callbacks.checkpoint import resumable_checkpoint

        trainer = self._trainer
        if trainer is None:  # training has not started: nothing to save
            return Interrupted(signum)
        newest = checkpoint_dir(trainer) / "last.ckpt" if saved else resumable_checkpoint(
            checkpoint_dir(trainer), clean=False)[0]
        return Interrupted(signum, step=trainer.global_step, checkpoint=newest, saved=saved,
                           run_dir=Path(trainer.default_root_dir))
