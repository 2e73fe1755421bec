"""Stop training on a NaN/inf loss or gradient, before it reaches the weights or a checkpoint."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback

from pmetal.errors import NonFiniteLossError, non_finite_error  # noqa: F401 (re-exported)


class NanGuard(Callback):
    """Raises a clear error when the loss or the gradients stop being finite.

    The check runs before the optimizer step, so the weights and later checkpoints never see the
    non-finite update.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            raise non_finite_error(trainer, f"the loss became {loss.item()}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        if not math.isfinite(norm.item()):
            raise non_finite_error(trainer, "the gradients became non-finite (NaN/inf)")
