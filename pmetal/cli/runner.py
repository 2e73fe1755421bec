"""Build the Lightning Trainer with pmetal's defaults and run fit; shared by every command.

Defaults: the accelerator and precision from `pmetal.device.choose_device` (mps > cuda > cpu),
gradient clipping at 1.0, atomic checkpoints every N steps and at the end (trainable parameters
only), a NaN/inf guard, tokens/s in the progress bar, metrics as CSV (and TensorBoard when it is
installed), the loss plot and the trained adapter/model in the run directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

from pmetal.device import choose_device

log = logging.getLogger("pmetal")


RUN_DIR_VARIABLE = "PMETAL_RUN_DIR"


def default_run_dir(method: str) -> Path:
    """`runs/<method>-<time>`, one directory for all the processes of a multi-device run.

    The processes Lightning starts for the other devices inherit the first's (`PMETAL_RUN_DIR`,
    set by `build_trainer`); processes started by SLURM or torchrun, which cannot share one
    clock reading, name the directory after the job (`SLURM_JOB_ID`, `TORCHELASTIC_RUN_ID`).
    """
    if "LOCAL_RANK" in os.environ and os.environ.get(RUN_DIR_VARIABLE):
        return Path(os.environ[RUN_DIR_VARIABLE])
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if job and job != "none":
        return Path("runs") / f"{method}-{job}"
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_strategy(strategy: Any, devices: Any, num_nodes: int) -> Any:
    """A Lightning strategy for pmetal's names: "ddp", "fsdp" (FSDP2's fully_shard) or Lightning's own.

    "fsdp" is Lightning's `ModelParallelStrategy` with every process in one data-parallel group:
    the module's `configure_model` shards each decoder layer with `fully_shard`
    (`pmetal.modules.distributed.shard_for_fsdp`), and checkpoints are written whole by rank 0, so
    a run can resume on another number of devices.
    """
    if not isinstance(strategy, str) or strategy != "fsdp":
        return strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pmetal.errors import PmetalError

    if os.environ.get("WORLD_SIZE", "").isdigit():  # torchrun / SLURM launched the processes
        world = int(os.environ["WORLD_SIZE"])
    elif isinstance(devices, int) and devices > 0:
        world = devices * num_nodes
    elif isinstance(devices, str) and devices.isdigit():
        world = int(devices) * num_nodes
    else:
        raise PmetalError(f"--strategy fsdp needs a device count (--devices N), got devices={devices!r}")
    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False)


def pmetal_callbacks(checkpoint_every_n_steps: int = 100, export_subdir: str = "final") -> list:
    """The callbacks every pmetal run has (checkpoint, NaN guard, loss plot, throughput, export)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from pmetal.callbacks.checkpoint import ExportOnTrainEnd, RngCheckpoint
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
        RngCheckpoint(),
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
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
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
    """A Lightning Trainer with pmetal's defaults, writing everything under `run_dir`.

    Args:
        devices: devices per machine: a count, or "auto" (every GPU on it). Above 1, Lightning
            starts one process per device (or joins those torchrun/SLURM started).
        num_nodes: machines taking part (torchrun's --nnodes, SLURM's --nodes).
        strategy: "auto" (one device, or DDP on several), "ddp" (each process holds the model and
            trains on its own shard of every global batch), "fsdp" (FSDP2: the frozen base and the
            adapters are sharded over the processes), or any Lightning strategy name.
    """
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from pmetal.callbacks.checkpoint import AtomicCheckpointIO

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if "LOCAL_RANK" not in os.environ:  # the processes Lightning launches for other devices write here too
        os.environ[RUN_DIR_VARIABLE] = str(run_dir)
    choice = choose_device(accelerator, precision)
    log.info(choice.describe())
    if callbacks is None:
        callbacks = pmetal_callbacks(checkpoint_every_n_steps)
    callbacks = list(callbacks) + list(extra_callbacks or [])
    for cb in callbacks:
        if type(cb).__name__ == "ModelCheckpoint" and cb.dirpath is None:
            cb.dirpath = str(run_dir / "checkpoints")
    if logger is None:
        logger = [CSVLogger(save_dir=str(run_dir), name="", version="")]
        if importlib.util.find_spec("tensorboard") is not None:
            from lightning.pytorch.loggers import TensorBoardLogger

            logger.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    plugins = list(trainer_kwargs.pop("plugins", None) or [])
    if not any(type(p).__name__ == "AtomicCheckpointIO" for p in plugins):
        plugins.append(AtomicCheckpointIO())
    # pmetal's batch samplers split batches by rank themselves; Lightning must not wrap them.
    defaults = {"enable_model_summary": False, "num_sanity_val_steps": 0, "use_distributed_sampler": False}
    trainer_kwargs = {**defaults, **trainer_kwargs}
    trainer = L.Trainer(
        devices=devices,
        num_nodes=num_nodes,
        strategy=resolve_strategy(strategy, devices, num_nodes),
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
    """`--resume` with no value resumes from `<run_dir>/checkpoints/last.ckpt`; a path is used as is."""
    from pmetal.errors import PmetalError

    if not resume:
        return None
    if resume is True or resume in ("last", "auto"):
        path = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            if resume == "auto":
                return None
            raise PmetalError(f"--resume: no checkpoint to resume from at {path}; pass --resume PATH.ckpt")
        return str(path)
    path = Path(resume)
    if not path.is_file():
        raise PmetalError(f"--resume: checkpoint not found: {path}")
    return str(path)


def fit(trainer, module, datamodule, *, ckpt_path: str | None = None) -> dict[str, Any]:
    """Run fit and return where the outputs went."""
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    run_dir = Path(trainer.default_root_dir)
    return {
        "rank": trainer.global_rank,
        "run_dir": run_dir,
        "export_dir": getattr(trainer, "pmetal_export_dir", None),
        "plot": getattr(trainer, "pmetal_plot_path", None),
        "metrics": run_dir / "metrics.csv",
        "seconds": time.time() - start,
        "steps": trainer.global_step,
    }


def report_outputs(result: dict, kind: str = "adapter") -> None:
    """Tell the user where everything went, in a few lines (once: by rank 0 of a multi-process run)."""
    if result.get("rank", 0) != 0:
        return
    run_dir = Path(result["run_dir"])
    lines = [f"done: {result['steps']} optimizer steps in {result['seconds']:.0f} s"]
    if result.get("export_dir"):
        lines.append(f"  {kind}: {result['export_dir']}")
    if result.get("plot"):
        lines.append(f"  loss plot: {result['plot']}")
    lines.append(f"  metrics: {run_dir / 'metrics.csv'}")
    lines.append(f"  checkpoints (for --resume): {run_dir / 'checkpoints'}")
    print("\n".join(lines), flush=True)
