"""Build the Lightning Trainer with pmetal's defaults and run fit; shared by every command.

Defaults: the accelerator and precision from `pmetal.device.choose_device` (mps > cuda > cpu),
gradient clipping at 1.0, atomic checkpoints every N steps and at the end (trainable parameters
only, never with non-finite values), a NaN/inf guard, tokens/s in the progress bar, metrics as CSV
(one row per step, kept across --resume; and TensorBoard when it is installed), the loss plot and
the trained adapter/model in the run directory.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from pmetal.device import choose_device

log = logging.getLogger("pmetal")


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def pmetal_callbacks(checkpoint_every_n_steps: int = 100, export_subdir: str = "final") -> list:
    """The callbacks every pmetal run has (checkpoint, NaN guard, loss plot, throughput, export)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from pmetal.callbacks.checkpoint import ExportOnTrainEnd
    from pmetal.callbacks.guards import NanGuard
    from pmetal.callbacks.plots import LossHistory

    callbacks = [
        ModelCheckpoint(
            dirpath=None,  # <default_root_dir>/checkpoints, see build_trainer
            filename="step-{step}",
            every_n_train_steps=checkpoint_every_n_steps,
            save_top_k=1,
            monitor="step",
            mode="max",
            save_last=True,
            auto_insert_metric_name=False,
        ),
        NanGuard(),
        LossHistory(),
        LearningRateMonitor(logging_interval="step"),
        ExportOnTrainEnd(export_subdir),
    ]
    try:
        from pmetal.callbacks.throughput import ThroughputMonitor
    except ImportError:  # pragma: no cover - written alongside
        ThroughputMonitor = None
    if ThroughputMonitor is not None:
        callbacks.append(ThroughputMonitor())
    return callbacks


def build_trainer(
    run_dir: str | Path,
    *,
    accelerator: str = "auto",
    precision: str = "auto",
    max_epochs: int | None = 1,
    max_steps: int = -1,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = 1.0,
    checkpoint_every_n_steps: int = 100,
    val_check_interval: Any = None,
    log_every_n_steps: int = 1,
    callbacks: list | None = None,
    extra_callbacks: list | None = None,
    logger: Any = None,
    enable_progress_bar: bool = True,
    **trainer_kwargs: Any,
):
    """A Lightning Trainer with pmetal's defaults, writing everything under `run_dir`."""
    import lightning as L

    from pmetal.callbacks.checkpoint import AtomicCheckpointIO
    from pmetal.callbacks.metrics_csv import RunCSVLogger

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    choice = choose_device(accelerator, precision)
    log.info(choice.describe())
    if callbacks is None:
        callbacks = pmetal_callbacks(checkpoint_every_n_steps)
    callbacks = list(callbacks) + list(extra_callbacks or [])
    for cb in callbacks:
        if type(cb).__name__ == "ModelCheckpoint" and cb.dirpath is None:
            cb.dirpath = str(run_dir / "checkpoints")
    if logger is None:
        logger = [RunCSVLogger(save_dir=str(run_dir))]
        if importlib.util.find_spec("tensorboard") is not None:
            from lightning.pytorch.loggers import TensorBoardLogger

            logger.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    plugins = list(trainer_kwargs.pop("plugins", None) or [])
    if not any(type(p).__name__ == "AtomicCheckpointIO" for p in plugins):
        plugins.append(AtomicCheckpointIO())
    # pmetal's batch samplers split batches by rank themselves; Lightning must not wrap them.
    defaults = {"devices": 1, "enable_model_summary": False, "num_sanity_val_steps": 0, "use_distributed_sampler": False}
    trainer_kwargs = {**defaults, **trainer_kwargs}
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=choice.accelerator,
        precision=choice.precision,
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val,
        val_check_interval=val_check_interval,
        log_every_n_steps=log_every_n_steps,
        callbacks=callbacks,
        logger=logger,
        plugins=plugins,
        enable_progress_bar=enable_progress_bar,
        **trainer_kwargs,
    )
    trainer.pmetal_device = choice
    return trainer


def resolve_resume(run_dir: str | Path, resume: str | bool | None) -> str | None:
    """The checkpoint `--resume` continues from, validated.

    With no value: the newest checkpoint in `<run_dir>/checkpoints` that reads and holds finite
    values (`last.ckpt`, else the newest `step-N.ckpt`), saying which was used and which were
    skipped and why; stray `*.tmp` files of an interrupted write are removed. A path is used as
    is, once it reads.
    """
    from pmetal.callbacks.checkpoint import checkpoint_problem, resumable_checkpoint
    from pmetal.errors import PmetalError

    if not resume:
        return None
    if resume is True or resume in ("last", "auto"):
        ckpt_dir = Path(run_dir) / "checkpoints"
        path, skipped = resumable_checkpoint(ckpt_dir)
        for bad, why in skipped:
            log.warning("--resume: skipped %s: %s", bad, why)
        if path is None:
            if resume == "auto":
                return None
            tried = f" (skipped {len(skipped)} that cannot be used)" if skipped else ""
            raise PmetalError(f"--resume: no usable checkpoint in {ckpt_dir}{tried}; pass --resume PATH.ckpt "
                              "or start a new run")
        log.info("--resume: continuing from %s%s", path, " (the newest usable checkpoint)" if skipped else "")
        return str(path)
    path = Path(resume)
    if not path.is_file():
        raise PmetalError(f"--resume: checkpoint not found: {path}")
    problem, _ = checkpoint_problem(path)
    if problem:
        raise PmetalError(f"--resume {path}: {problem}; expected a checkpoint written by pmetal (checkpoints/*.ckpt)")
    return str(path)


def fit(trainer, module, datamodule, *, ckpt_path: str | None = None) -> dict[str, Any]:
    """Run fit and return where the outputs went."""
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    run_dir = Path(trainer.default_root_dir)
    return {
        "run_dir": run_dir,
        "export_dir": getattr(trainer, "pmetal_export_dir", None),
        "plot": getattr(trainer, "pmetal_plot_path", None),
        "metrics": run_dir / "metrics.csv",
        "seconds": time.time() - start,
        "steps": trainer.global_step,
    }


def report_outputs(result: dict, kind: str = "adapter") -> None:
    """Tell the user where everything went, in a few lines."""
    run_dir = Path(result["run_dir"])
    lines = [f"done: {result['steps']} optimizer steps in {result['seconds']:.0f} s"]
    if result.get("export_dir"):
        lines.append(f"  {kind}: {result['export_dir']}")
    if result.get("plot"):
        lines.append(f"  loss plot: {result['plot']}")
    lines.append(f"  metrics: {run_dir / 'metrics.csv'}")
    lines.append(f"  checkpoints (for --resume): {run_dir / 'checkpoints'}")
    print("\n".join(lines), flush=True)
