"""Checkpoints that survive a kill: atomic writes, trainable-only state, export at the end.

A checkpoint is written to a temporary file in the same directory and renamed over the target,
so a run killed mid-write leaves the previous checkpoint intact (and a stray `.NAME.*.tmp`, which
`resumable_checkpoint` removes). A checkpoint whose parameters or optimizer state are not finite
is never written. Resuming validates the candidates (newest first) and falls back to the newest
one that reads and holds finite values. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pmetal.atomic import atomic_output, default_mode

log = logging.getLogger("pmetal")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with temp-file + rename saves and weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        path = Path(path)
        problem = non_finite_entry(checkpoint)
        if problem:
            from pmetal.errors import NonFiniteLossError

            kept = resumable_checkpoint(path.parent, clean=False)[0]
            raise NonFiniteLossError(f"training diverged: {problem} at step {checkpoint.get('global_step')}, so "
                                     f"{path.name} was not written. {kept_message(kept)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode(directory=False))  # mkstemp makes 0600; a checkpoint is an ordinary file
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise disk_full_error(path, checkpoint, exc) from None
            raise

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def checkpoint_bytes(value: Any) -> int:
    """The bytes of the tensors in a checkpoint (what its file needs, give or take the index)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(checkpoint_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in value)
    return 0


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def disk_full_error(path: Path, checkpoint: dict[str, Any], exc: OSError):
    """One line for a checkpoint write the disk had no room for: what, where, the space it needs and
    the checkpoint kept (the write went to a temporary file, so the previous one is intact)."""
    from pmetal.errors import PmetalError

    kept = resumable_checkpoint(path.parent, clean=False)[0]
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
    keeping = f"the previous checkpoint is kept: {kept}" if kept else "no earlier checkpoint exists"
    return PmetalError(f"{path.parent}: disk full while writing {path.name} at step {checkpoint.get('global_step')} "
                       f"({exc.strerror}); it needs about {megabytes(checkpoint_bytes(checkpoint))}, "
                       f"{megabytes(free)} are free; {keeping}; expected room for it: free some space, then --resume")


def full_state_dict(module) -> dict | None:
    """The policy's whole state dict gathered from its FSDP2 shards (a collective: every rank calls it).

    None when nothing is sharded (one process, DDP). Under FSDP rank 0 receives the tensors, on the CPU.
    """
    from torch.distributed.tensor import DTensor

    policy = getattr(module, "policy", None)
    if policy is None or not any(isinstance(p, DTensor) for p in policy.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
        if not hasattr(pl_module, "save_pretrained") or self.failed:
            return
        state = full_state_dict(pl_module)  # FSDP: every rank takes part in gathering the shards
        if not trainer.is_global_zero:
            return
        out = Path(trainer.default_root_dir) / self.subdir
        with atomic_output(out, directory=True) as staging:  # a kill mid-save leaves no half-written final/
            pl_module.save_pretrained(staging) if state is None else pl_module.save_pretrained(staging, state_dict=state)
        self.export_dir = out
        log.info("saved the trained %s to %s", getattr(pl_module, "artifact_kind", "model"), out)



# ----------------------------------------------------------------------------------------------
# Validating and choosing checkpoints
# ----------------------------------------------------------------------------------------------


def non_finite_entry(checkpoint: dict[str, Any]) -> str | None:
    """The first parameter or optimizer-state tensor of a checkpoint that holds NaN/inf, described."""
    for name, value in (checkpoint.get("state_dict") or {}).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return f"parameter {name} is not finite"
    for k, state in enumerate(checkpoint.get("optimizer_states") or []):
        for slot in (state.get("state") or {}).values():
            for key, value in slot.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    return f"optimizer {k} state {key!r} is not finite"
    return None


def checkpoint_problem(path: str | Path) -> tuple[str | None, int | None]:
    """(why `path` cannot be resumed from, or None; its global step when it reads)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the zip reader and unpickler raise many types for a cut-off file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"unreadable ({reason[:160]})", None
    if not isinstance(state, dict) or "state_dict" not in state:
        return "not a Lightning checkpoint (no state_dict)", None
    return non_finite_entry(state), state.get("global_step")


def _newest_first(ckpt_dir: Path) -> list[Path]:
    """`last*.ckpt` (written after the step checkpoint of the same step), then `step-N.ckpt` by N, then by time."""
    def key(p: Path):
        if p.name.startswith("last"):
            return (2, 0, p.stat().st_mtime)
        number = p.stem.rpartition("-")[2]
        return (1, int(number), p.stat().st_mtime) if number.isdigit() else (0, 0, p.stat().st_mtime)

    return sorted((p for p in ckpt_dir.glob("*.ckpt") if p.is_file()), key=key, reverse=True)


def remove_stray_temp_files(ckpt_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were interrupted (by a kill)."""
    stray = [p for p in Path(ckpt_dir).glob(".*.tmp") if p.is_file()]
    for p in stray:
        p.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted checkpoint write", p)
    return stray


def resumable_checkpoint(ckpt_dir: str | Path, *, clean: bool = True,
                         before_step: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint in `ckpt_dir` that reads and holds finite values, and those skipped (path, why).

    `clean` removes stray `*.tmp` files first; `before_step` skips checkpoints of that global step
    or later (their weights are the ones that diverged).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, []
    if clean:
        remove_stray_temp_files(ckpt_dir)
    skipped: list[tuple[Path, str]] = []
    for path in _newest_first(ckpt_dir):
        problem, step = checkpoint_problem(path)
        if problem is None and before_step is not None and step is not None and step >= before_step:
            problem = f"holds the weights of step {step}, which gave the non-finite loss"
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def set_aside_unusable(skipped: list[tuple[Path, str]]) -> list[Path]:
    """Rename the checkpoints `resumable_checkpoint` skipped as unreadable to `<name>.corrupt`.

    Left in place, a corrupt `last.ckpt` makes Lightning write the new state to `last-v1.ckpt`
    (and a later `--resume` meet the corrupt one first); renamed rather than deleted, so nothing
    is lost. Checkpoints skipped for non-finite values are `.diverged` ones' business (NanGuard).
    """
    moved = []
    for path, why in skipped:
        if why.startswith("unreadable") or why.startswith("not a Lightning checkpoint"):
            target = path.with_name(path.name + ".corrupt")
            os.replace(path, target)
            moved.append(target)
    return moved


def kept_message(kept: Path | None) -> str:
    if kept is None:
        return "No checkpoint with finite weights from before the divergence exists."
    return f"The last good checkpoint (finite weights) is kept: {kept}; resume with --resume {kept}."


def set_aside_diverged(ckpt_dir: str | Path, step: int) -> list[Path]:
    """Rename checkpoints of global step >= `step` (or with non-finite values) to `*.ckpt.diverged`.

    They hold the weights that produced the non-finite loss, so `--resume` must not pick them;
    renamed rather than deleted, so nothing is lost.
    """
    moved = []
    for path in Path(ckpt_dir).glob("*.ckpt") if Path(ckpt_dir).is_dir() else []:
        problem, at = checkpoint_problem(path)
        if (at is not None and at >= step) or (problem and "not finite" in problem):
            target = path.with_name(path.name + ".diverged")
            os.replace(path, target)
            moved.append(target)
    return moved


def _numpy_state() -> list | None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]


def _set_numpy_state(state: list | None) -> None:
    if state is None:
        return
    import numpy as np

    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _device_rng(device: torch.device) -> tuple[Any, Any] | None:
    """(get_rng_state, set_rng_state) of an accelerator's default generator, None on CPU."""
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device)), (lambda s: torch.cuda.set_rng_state(s, device))
    if device.type == "mps":
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


class RngCheckpoint(Callback):
    """Saves every rank's random state in the checkpoint and restores it on resume.

    The state covers the generators a run draws from while it trains: torch's CPU generator and the
    accelerator's (dropout, sampled rollouts), Python's and NumPy's, and the DataModule's own draws
    (`random_state()`, e.g. DAPO's dynamic-sampling prompts). Each rank's state is gathered to the
    checkpoint (`torch.distributed.all_gather_object`), so a resumed run draws exactly the numbers
    the uninterrupted one would have. It is restored when training starts, after everything that
    builds the run (model, loaders) has drawn its numbers as in the first run. A checkpoint from
    another number of processes restores the ranks it has and warns for the others.
    """

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None

    @staticmethod
    def _state(trainer, pl_module) -> dict[str, Any]:
        import random

        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
                                 "numpy": _numpy_state()}
        device_rng = _device_rng(pl_module.device)
        if device_rng is not None:
            state["device"] = device_rng[0]()
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "random_state"):
            state["datamodule"] = datamodule.random_state()
        return state

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        local = self._state(trainer, pl_module)
        import torch.distributed as dist

        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        # in the place Lightning restores callback states from (`load_state_dict` below)
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("ranks")

    def on_train_start(self, trainer, pl_module) -> None:
        import random

        ranks, self._loaded = self._loaded, None
        if not ranks:
            return
        rank = trainer.global_rank
        if len(ranks) != trainer.world_size and rank == 0:
            log.warning("the checkpoint holds the random state of %d process(es), this run has %d: ranks beyond "
                        "the checkpoint's keep their fresh random state", len(ranks), trainer.world_size)
        if rank >= len(ranks):
            return
        state = ranks[rank]
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
        _set_numpy_state(state.get("numpy"))
        device_rng = _device_rng(pl_module.device)
        if device_rng is not None and state.get("device") is not None:
            device_rng[1](state["device"])
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "load_random_state") and state.get("datamodule"):
            datamodule.load_random_state(state["datamodule"])
