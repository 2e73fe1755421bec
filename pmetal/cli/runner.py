"""Build the Lightning Trainer with pmetal's defaults and run fit; shared by every command.

`build_trainer`'s signature is the one typed source of the Trainer settings: the PMetal commands
derive their flags from it (pmetal/cli/flags.py) and `pmetal fit` hands it to LightningCLI as the
trainer class, so `--trainer.<name>` and YAML `trainer:` keys are its parameters (and, through
`**trainer_kwargs`, every other `lightning.Trainer` argument).

Defaults: the accelerator and precision from `pmetal.device.choose_device` (mps > cuda > cpu),
gradient clipping at 1.0, atomic checkpoints every N steps and at the end (trainable parameters
only, never with non-finite values), a NaN/inf guard, tokens/s in the progress bar, metrics as CSV
(one row per step, kept across --resume; and TensorBoard when it is installed), the loss plot and
the trained adapter/model in the run directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from pmetal.device import choose_device
from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")

LoggerName = Literal["csv", "tensorboard", "wandb"]


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
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pmetal.callbacks.checkpoint import ExportOnTrainEnd, RngCheckpoint
    from pmetal.callbacks.guards import NanGuard
    from pmetal.callbacks.interrupt import InterruptCheckpoint
    from pmetal.callbacks.metrics_csv import OptimizerStepAxis
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
        OptimizerStepAxis(),  # every record of the run numbered by optimizer steps
        RngCheckpoint(),
        LossHistory(),
        ExportOnTrainEnd(export_subdir),
        InterruptCheckpoint(),  # SIGINT/SIGTERM: the current step's checkpoint, then stop
    ]
    try:
        from pmetal.callbacks.throughput import ThroughputMonitor
    except ImportError:  # pragma: no cover - written alongside
        ThroughputMonitor = None
    if ThroughputMonitor is not None:
        callbacks.append(ThroughputMonitor())
    return callbacks


def build_loggers(logger: Any, run_dir: Path) -> Any:
    """Lightning loggers from `logger`: names (csv, tensorboard, wandb), Logger objects, None or a bool."""
    if logger is False or isinstance(logger, Logger) or (
            isinstance(logger, (list, tuple)) and all(isinstance(x, Logger) for x in logger) and logger):
        return logger
    if logger is None or logger is True:
        names = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else [])
    else:
        names = logger.split(",") if isinstance(logger, str) else list(logger)
    loggers = []
    for name in names:
        if not isinstance(name, str):
            loggers.append(name)  # a Logger object beside named ones
        elif name == "csv":
            from pmetal.callbacks.metrics_csv import RunCSVLogger  # appends across --resume, a row per step

            loggers.append(RunCSVLogger(save_dir=str(run_dir)))
        elif name in ("tensorboard", "wandb"):
            package = "tensorboard" if name == "tensorboard" else "wandb"
            if importlib.util.find_spec(package) is None:
                raise PmetalError(f"logger {name!r} needs the {package} package, which is not installed: "
                                  f"pip install {package} (or pick another logger: csv, tensorboard, wandb)")
            if name == "tensorboard":
                from lightning.pytorch.loggers import TensorBoardLogger

                loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
            else:
                from lightning.pytorch.loggers import WandbLogger

                loggers.append(WandbLogger(save_dir=str(run_dir), project="pmetal", name=run_dir.name))
        else:
            raise PmetalError(f"unknown logger {name!r}; expected csv, tensorboard or wandb")
    return loggers


def cpu_fp16_autocast():
    """Lightning's precision plugin for fp16 autocast on the CPU, with a gradient scaler.

    Lightning swaps "16-mixed" for "bf16-mixed" on the CPU without being asked; torch's CPU autocast
    and GradScaler do run float16, and that is what a user who asks for 16-mixed (and the precision
    tests, standing in for fp16 on older Macs) must get.
    """
    import torch
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def build_trainer(
    default_root_dir: Union[str, Path, None] = None,
    *,
    accelerator: Literal["auto", "mps", "cuda", "cpu"] = "auto",
    precision: str = "auto",
    max_epochs: Optional[int] = None,
    max_steps: int = -1,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: Optional[float] = 1.0,
    checkpoint_every_n_steps: int = 100,
    val_check_interval: Optional[Union[int, float]] = None,
    check_val_every_n_epoch: Optional[int] = 1,
    log_every_n_steps: int = 1,
    logger: Union[LoggerName, list[LoggerName], Logger, list[Logger], bool, None] = None,
    enable_progress_bar: bool = True,
    devices: Union[int, str] = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    num_sanity_val_steps: int = 0,
    enable_model_summary: bool = False,
    use_distributed_sampler: bool = False,
    callbacks: Optional[list[Callback]] = None,
    plugins: Optional[list[Any]] = None,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """A Lightning Trainer with pmetal's defaults, writing everything under `default_root_dir`.

    Args:
        default_root_dir: the run directory: checkpoints, metrics, the loss plot and the trained
            adapter or model go there; None means a new runs/<method>-<time>.
        accelerator: "auto" (mps, then cuda, then cpu), "mps", "cuda" or "cpu".
        precision: "auto" (bf16 autocast where the device has it, fp16 autocast otherwise on a GPU,
            fp32 on CPU), or a Lightning precision: "32-true", "bf16-mixed", "16-mixed", "bf16-true".
        max_epochs: passes over the training data; None: one pass, or as many as max_steps needs
            when max_steps is set (as Hugging Face's Trainer, max_steps alone then decides).
        max_steps: stop after this many optimizer steps (-1: the epochs decide).
        accumulate_grad_batches: batches whose gradients add up to one optimizer step.
        gradient_clip_val: clip the gradient norm to this value; 0 or None turns clipping off.
        checkpoint_every_n_steps: write a checkpoint every N optimizer steps (and at the end).
        val_check_interval: validate every N training batches (an int, counted across epochs) or
            at this fraction of an epoch (a float); None validates at the end of each epoch.
        check_val_every_n_epoch: validate after every N epochs; None when val_check_interval
            counts batches across epochs (an int val_check_interval sets it to None).
        log_every_n_steps: log metrics every N optimizer steps.
        logger: where metrics go: "csv" (metrics.csv), "tensorboard", "wandb", a list of them
            (comma-separated on a PMetal command: csv,wandb), Lightning Logger objects, or False
            for none; None means CSV plus TensorBoard when it is installed.
        enable_progress_bar: show the progress bar with loss, learning rate and tokens/s.
        devices: devices per machine: a count, or "auto" (every GPU on it). Above 1, Lightning
            starts one process per device (or joins those torchrun/SLURM started).
        num_nodes: machines taking part (torchrun's --nnodes, SLURM's --nodes).
        strategy: "auto" (one device, or DDP on several), "ddp" (each process holds the model and
            trains on its own shard of every global batch), "fsdp" (FSDP2: the frozen base and the
            adapters are sharded over the processes), or any Lightning strategy name.
        num_sanity_val_steps: validation batches run before training as a check (0: none).
        enable_model_summary: print Lightning's table of the model's layers before training.
        use_distributed_sampler: let Lightning wrap the training sampler for distributed runs;
            off, as pmetal's batch samplers shard batches by rank themselves.
        callbacks: more callbacks, run after pmetal's own (checkpoints, NaN guard, loss plot,
            learning-rate monitor, export, throughput).
        plugins: Lightning plugins; pmetal's atomic checkpoint writer is added unless one is given.
    """
    from pmetal.callbacks.checkpoint import AtomicCheckpointIO

    from pmetal.runlock import hold_run_lock

    run_dir = Path(default_root_dir) if default_root_dir is not None else default_run_dir("run")
    hold_run_lock(run_dir)  # one run per folder, for this process's life (taken already by the CLI's checks)
    if "LOCAL_RANK" not in os.environ:  # the processes Lightning launches for other devices write here too
        os.environ[RUN_DIR_VARIABLE] = str(run_dir)
    choice = choose_device(accelerator, precision)
    log.info(choice.describe())
    callbacks = pmetal_callbacks(checkpoint_every_n_steps) + list(callbacks or [])
    for cb in callbacks:
        if type(cb).__name__ == "ModelCheckpoint" and cb.dirpath is None:
            cb.dirpath = str(run_dir / "checkpoints")
    plugins = list(plugins or [])
    if not any(type(p).__name__ == "AtomicCheckpointIO" for p in plugins):
        plugins.append(AtomicCheckpointIO())
    precision_setting = choice.precision
    if choice.accelerator == "cpu" and choice.precision == "16-mixed":
        plugins.append(cpu_fp16_autocast())
        precision_setting = None  # the plugin is the precision; Lightning refuses both
    if max_epochs is None and max_steps < 0:
        max_epochs = 1  # neither given: one pass (with max_steps given, Lightning then runs epochs until it)
    if isinstance(val_check_interval, int) and not isinstance(val_check_interval, bool):
        check_val_every_n_epoch = None  # N batches across epochs, not N batches of one epoch
    return L.Trainer(
        num_nodes=num_nodes,
        strategy=resolve_strategy(strategy, devices, num_nodes),
        default_root_dir=str(run_dir),
        accelerator=choice.accelerator,
        precision=precision_setting,
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val or None,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=check_val_every_n_epoch,
        log_every_n_steps=log_every_n_steps,
        logger=build_loggers(logger, run_dir),
        enable_progress_bar=enable_progress_bar,
        devices=devices,
        num_sanity_val_steps=num_sanity_val_steps,
        enable_model_summary=enable_model_summary,
        use_distributed_sampler=use_distributed_sampler,
        callbacks=callbacks,
        plugins=plugins,
        **trainer_kwargs,
    )


def hand_clipping_to_module(module_class, model: dict, trainer: dict) -> None:
    """A module that steps its own optimizer (`clips_own_gradients`: the GRPO family) clips its own
    gradients, which Lightning's Trainer refuses to do for it: the Trainer's `gradient_clip_val`
    becomes the module's `max_grad_norm` (unless that is given) and the Trainer's is unset."""
    if not getattr(module_class, "clips_own_gradients", False):
        return
    if model.get("max_grad_norm") is None:
        model["max_grad_norm"] = trainer.get("gradient_clip_val") or None
    trainer["gradient_clip_val"] = None


def resolve_resume(run_dir: str | Path, resume: str | bool | None) -> str | None:
    """The checkpoint `--resume` continues from, validated.

    With no value: the newest checkpoint in `<run_dir>/checkpoints` that reads and holds finite
    values (`last.ckpt`, else the newest `step-N.ckpt`), saying which was used and which were
    skipped and why; stray `*.tmp` files of an interrupted write are removed. A path is used as
    is, once it reads.
    """
    from pmetal.callbacks.checkpoint import checkpoint_problem, resumable_checkpoint, set_aside_unusable
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
            raise PmetalError(f"--resume: no usable checkpoint in {ckpt_dir}{tried}; pass --resume PATH.ckpt, "
                              "or rerun without --resume and with --overwrite to start this run over")
        for moved in set_aside_unusable(skipped):  # so the new state is last.ckpt again, not last-v1.ckpt
            log.warning("--resume: moved the unusable %s aside to %s", moved.with_suffix(""), moved)
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
    from pmetal.callbacks.checkpoint import ExportOnTrainEnd, checkpoint_problem
    from pmetal.callbacks.plots import LossHistory

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from pmetal.callbacks.interrupt import InterruptCheckpoint
    from pmetal.cli.interrupts import forwarded_to

    start = time.time()
    resumed_at = (checkpoint_problem(ckpt_path)[1] or 0) if ckpt_path else 0  # "done:" counts this run's steps
    stopper = next((cb for cb in trainer.callbacks if isinstance(cb, InterruptCheckpoint)), None)
    with forwarded_to(stopper.request_stop if stopper else None):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:  # Lightning's own stop (SIGTERM outside a training step): exit status 0 else
            import signal

            raise (stopper.interrupted(signal.SIGTERM, saved=False) if stopper else SystemExit(143)) from None
    run_dir = Path(trainer.default_root_dir)
    # the callbacks build_trainer added keep what they wrote
    export = next((cb.export_dir for cb in trainer.callbacks if isinstance(cb, ExportOnTrainEnd)), None)
    plot = next((cb.plot_path for cb in trainer.callbacks if isinstance(cb, LossHistory)), None)
    return {
        "rank": trainer.global_rank,
        "run_dir": run_dir,
        "export_dir": export,
        "plot": plot,
        "metrics": run_dir / "metrics.csv",
        "seconds": time.time() - start,
        "steps": trainer.global_step - resumed_at,  # this run's
        "total_steps": trainer.global_step,
    }


def run_dir_for(output_dir: str | Path | None, resume: str | None, method: str) -> Path:
    """The run directory: --output-dir, the directory of a resumed checkpoint, or a new one."""
    if output_dir:
        return Path(output_dir)
    if resume and resume != "last" and Path(resume).is_file():
        return Path(resume).resolve().parent.parent
    if resume:
        raise PmetalError("--resume needs --output-dir (the run to continue) or a checkpoint path")
    return default_run_dir(method)


def launch(args, settings, method: str, module, datamodule, **trainer_overrides: Any) -> dict:
    """A PMetal command's run: the Trainer from its resolved settings, fit, and where the outputs went."""
    trainer_kwargs = {**settings.trainer, **trainer_overrides}
    resume = getattr(args, "resume", None)
    run_dir = run_dir_for(trainer_kwargs.pop("default_root_dir", None), resume, method)
    trainer = build_trainer(run_dir, **trainer_kwargs)
    result = fit(trainer, module, datamodule, ckpt_path=resolve_resume(run_dir, resume))
    report_outputs(result, getattr(module, "artifact_kind", "model"))
    return result


def report_outputs(result: dict, kind: str = "adapter") -> None:
    """Tell the user where everything went, in a few lines (once: by rank 0 of a multi-process run)."""
    if result.get("rank", 0) != 0:
        return
    run_dir = Path(result["run_dir"])
    total = result.get("total_steps", result["steps"])
    resumed = f" ({total} in total, resumed at step {total - result['steps']})" if total != result["steps"] else ""
    lines = [f"done: {result['steps']} optimizer steps{resumed} in {result['seconds']:.0f} s"]
    if result.get("export_dir"):
        lines.append(f"  {kind}: {result['export_dir']}")
    if result.get("plot"):
        lines.append(f"  loss plot: {result['plot']}")
    if (run_dir / "metrics.csv").is_file():
        lines.append(f"  metrics: {run_dir / 'metrics.csv'}")
    lines.append(f"  checkpoints (for --resume): {run_dir / 'checkpoints'}")
    print("\n".join(lines), flush=True)
