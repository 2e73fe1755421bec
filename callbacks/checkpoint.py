"""Checkpoints that survive a kill: atomic writes, trainable-only state, export at the end.

A checkpoint is written to a temporary file in the same directory and renamed over the target,
so a run killed mid-write leaves the previous checkpoint intact. Loading uses
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("pmetal")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with temp-file + rename saves and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class ExportOnTrainEnd(Callback):
    """Saves the trained adapter (or full model), tokenizer and config into `<run_dir>/<subdir>`.

    `export_dir` is where the last fit saved it (None before, or when training failed).
    """

    def __init__(self, subdir: str = "final") -> None:
        self.subdir = subdir
        self.export_dir: Path | None = None
        self.failed = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self.export_dir, self.failed = None, False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.failed = True  # a broken model (NaN, a crash) is never exported

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "save_pretrained") or self.failed:
            return
        out = Path(trainer.default_root_dir) / self.subdir
        pl_module.save_pretrained(out)
        self.export_dir = out
        log.info("saved the trained %s to %s", getattr(pl_module, "artifact_kind", "model"), out)
