"""Stop training on a NaN/inf loss or gradient, before it reaches the weights or a checkpoint.

`NanGuard` is the one finite-loss check of every pmetal run (the methods do not check again): it
looks at the loss before backward (automatic and manual optimization alike) and at the gradients
before the optimizer step. On a stop it sets aside the checkpoints that hold the weights which
produced the non-finite loss (`*.ckpt.diverged`) and names the last good one; `LossHistory`
writes the curve of the steps that ran.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from lightning.pytorch import Callback

from pmetal.callbacks.checkpoint import kept_message, resumable_checkpoint, set_aside_diverged
from pmetal.errors import NonFiniteLossError

log = logging.getLogger("pmetal")


# Under fp16 a gradient scaler skips a step whose gradients overflowed and halves its scale; this
# many such steps in a row (the scale divided by 2^20) means the gradients are non-finite at any scale.
MAX_SCALER_SKIPS = 20


class NanGuard(Callback):
    """Raises `NonFiniteLossError` when the loss or the gradients stop being finite.

    The loss is checked before backward and the gradients before the optimizer step, so the
    weights never take the non-finite update and no later checkpoint holds it. Under a gradient
    scaler (16-mixed) overflowing gradients are the scaler's to handle (it skips the step and lowers
    its scale, as fp16 training expects in its first steps); only `MAX_SCALER_SKIPS` in a row stop.
    """

    def __init__(self) -> None:
        self.scaler_skips = 0  # consecutive steps the gradient scaler skipped

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            raise non_finite_stop(trainer, f"the loss became {loss.detach().float().flatten()[0].item()}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
        if math.isfinite(norm.item()):
            self.scaler_skips = 0
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None and self.scaler_skips < MAX_SCALER_SKIPS:
            self.scaler_skips += 1  # the scaler skips this update and lowers its scale
            log.info("fp16 gradients overflowed at step %d: the gradient scaler skips this update and lowers its scale",
                     trainer.global_step)
            return
        raise non_finite_stop(trainer, "the gradients became non-finite (NaN/inf)"
                              + (f" in {MAX_SCALER_SKIPS} steps in a row under the gradient scaler"
                                 if self.scaler_skips else ""))


def non_finite_stop(trainer, what: str) -> NonFiniteLossError:
    """The error of a stop: what went wrong, at which step, and the checkpoint to resume from."""
    step = trainer.global_step
    kept, set_aside = None, []
    for directory in {cb.dirpath for cb in getattr(trainer, "checkpoint_callbacks", []) if getattr(cb, "dirpath", None)}:
        set_aside += set_aside_diverged(directory, step)
        kept = kept or resumable_checkpoint(directory, clean=False)[0]
    aside = f" Set aside (they hold the weights that diverged): {', '.join(p.name for p in set_aside)}." if set_aside else ""
    plot = Path(trainer.default_root_dir) / "loss.png"
    return NonFiniteLossError(
        f"{what} at step {step} (epoch {trainer.current_epoch}); training stopped before the update. "
        f"{kept_message(kept)}{aside} The loss of the steps that ran: {plot}. Try a lower learning rate, "
        "fp32/bf16 instead of fp16, or check the data for empty completions."
    )
