"""AdamW over trainable parameters and learning-rate schedules (warmup + cosine/linear/constant)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from pmetal.errors import PmetalError

LR_SCHEDULES = ("cosine", "linear", "constant")


def build_optimizer(
    params: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float = 0.0, betas=(0.9, 0.999)
) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    if not decay and not no_decay:
        raise PmetalError("no trainable parameters: check the adapter settings (target_modules?)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # Not fused: Lightning's mixed-precision plugin refuses gradient clipping with a fused optimizer
    # (it unscales gradients internally), and clipping at 1.0 is on by default.
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The factor applied to the base learning rate at optimizer step `step` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over `warmup_steps`, then cosine or linear decay to
    `min_ratio` at `total_steps`, or constant.
    """
    if schedule not in LR_SCHEDULES:
        raise PmetalError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_steps: int,
    total_steps: int | Callable[[], int],
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_multiplier`.

    `total_steps` may be a callable, asked only when a step > 0 needs it: Lightning's
    `estimated_stepping_batches` builds the train dataloader, and doing that inside
    `configure_optimizers` (before a checkpoint is restored) would stop a resumed run from restoring
    its mid-epoch data position.
    """
    lr_multiplier(0, schedule=schedule, warmup_steps=warmup_steps, total_steps=1)  # validates names
    resolved: list[int] = []

    def total() -> int:
        if not resolved:
            resolved.append(max(int(total_steps() if callable(total_steps) else total_steps), 1))
        return resolved[0]

    def multiplier(step: int) -> float:
        if step == 0 and warmup_steps == 0:
            return 1.0  # does not depend on the total
        return lr_multiplier(step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total(), min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
