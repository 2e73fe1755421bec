"""`metrics.csv` with one row per optimizer step, kept across `--resume`.

Lightning's CSVLogger deletes an existing metrics.csv when it starts, writes several rows for
one step (training, validation and learning-rate metrics each get their own), numbers steps from
0 while `loss_history.json` and the checkpoint names count optimizer steps from 1 (Lightning's
logging step counts batches, which is not the optimizer-step count where a method steps its
optimizer several times a batch: GRPO's `num_iterations`), and a resumed run with a validation
split could crash on the header. `RunCSVLogger` and `OptimizerStepAxis` fix all four:

- the existing file is read back; the first step the resumed run logs replaces that step and
  every later one (those ran after the checkpoint and are run again), earlier rows stay;
- the metrics of one step are merged into one row;
- `step` is the number of optimizer steps done (`trainer.global_step`: 1 after the first), as in
  `loss_history.json`, the checkpoint names and the final summary, for every method:
  `OptimizerStepAxis` logs it as Lightning's `step` metric, which Lightning hands every logger
  (CSV, TensorBoard, wandb) as the step of the record;
- the header is the union of every metric seen, and the file is rewritten atomically, at least
  whenever a checkpoint is written, so a kill loses no row a resume would not write again.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger

from pmetal.atomic import default_mode


class _StepRowsWriter:
    """Rows keyed by step, rewritten whole on each save (Lightning's `_ExperimentWriter` interface)."""

    NAME_METRICS_FILE = "metrics.csv"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.rows: dict[int, dict[str, Any]] = {}
        self._resumed = False  # the first step logged by this process cuts the old rows from there
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                for row in csv.DictReader(f):
                    values = {k: v for k, v in row.items() if k and v not in ("", None)}
                    if "step" in values:
                        self.rows[int(float(values.pop("step")))] = values

    def log_metrics(self, metrics_dict: dict[str, Any], step: Optional[int] = None) -> None:
        step = (max(self.rows) if self.rows else 0) if step is None else int(step)
        if not self._resumed:
            self.rows = {s: row for s, row in self.rows.items() if s < step}
            self._resumed = True
        row = self.rows.setdefault(step, {})
        for key, value in metrics_dict.items():
            row[key] = value.item() if hasattr(value, "item") else value

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self.rows.values())

    def log_hparams(self, params: dict[str, Any]) -> None:
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        self.hparams = {**getattr(self, "hparams", {}), **params}
        save_hparams_to_yaml(os.path.join(self.log_dir, "hparams.yaml"), self.hparams)

    def save(self) -> None:
        if not self.rows:
            return
        keys = sorted({k for row in self.rows.values() for k in row})
        fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=self.log_dir)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["step", *keys])
                writer.writeheader()
                for step in sorted(self.rows):
                    writer.writerow({"step": step, **self.rows[step]})
            os.chmod(tmp, default_mode(directory=False))  # mkstemp makes 0600
            os.replace(tmp, self.metrics_file_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `<save_dir>/metrics.csv` as `_StepRowsWriter` does (see the module docstring)."""

    def __init__(self, save_dir: str, **kwargs: Any) -> None:
        kwargs.setdefault("name", "")
        kwargs.setdefault("version", "")
        super().__init__(save_dir=save_dir, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> _StepRowsWriter:
        if self._experiment is None:
            self._experiment = _StepRowsWriter(self.log_dir)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Every row up to a checkpoint is on disk, so a kill after it loses none of them."""
        self.save()


class OptimizerStepAxis(Callback):
    """Logs `step` = `trainer.global_step` with the training and the validation metrics.

    Lightning numbers a record by the `step` metric when one is logged, else by the batches done.
    Logged at the end of each training batch (after the optimizer steps of the batch; before
    `ModelCheckpoint`, which Lightning runs last and which names checkpoints by the same value)
    and of each validation run, so every logger and `metrics.csv` count optimizer steps.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("step", float(trainer.global_step), on_step=True, on_epoch=False, batch_size=1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("step", float(trainer.global_step), on_step=False, on_epoch=True, batch_size=1)
