"""fp16 mixed precision as users get it: 16-mixed is fp16 on the CPU too, the gradient scaler's
overflow skips are not a divergence, and GRPO (manual optimization) clips unscaled gradients."""

from __future__ import annotations

import json
import types

import pytest
import torch


def test_16_mixed_on_the_cpu_is_fp16_autocast_with_a_gradient_scaler(tmp_path):
    """Lightning alone swaps 16-mixed for bf16-mixed on the CPU; pmetal keeps what was asked for."""
    from pmetal.cli.runner import build_trainer

    trainer = build_trainer(tmp_path, accelerator="cpu", precision="16-mixed", enable_progress_bar=False, logger=False)
    plugin = trainer.precision_plugin
    assert plugin.precision == "16-mixed" and plugin.scaler is not None
    with plugin.forward_context():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    bf16 = build_trainer(tmp_path, accelerator="cpu", precision="bf16-mixed", enable_progress_bar=False, logger=False)
    assert bf16.precision_plugin.precision == "bf16-mixed" and getattr(bf16.precision_plugin, "scaler", None) is None


def _trainer(scaler):
    return types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=scaler), global_step=3,
                                 current_epoch=0, checkpoint_callbacks=[], default_root_dir="/nonexistent")


def _optimizer(grad):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = grad
    return torch.optim.SGD([p], lr=0.1)


def test_nanguard_leaves_fp16_overflow_to_the_gradient_scaler_until_it_persists():
    from pmetal.callbacks.guards import MAX_SCALER_SKIPS, NanGuard
    from pmetal.errors import NonFiniteLossError

    inf = _optimizer(torch.tensor([float("inf"), 1.0]))
    guard = NanGuard()
    with pytest.raises(NonFiniteLossError, match="non-finite"):  # no scaler: an inf gradient is a divergence
        guard.on_before_optimizer_step(_trainer(None), None, inf)
    scaled = _trainer(torch.amp.GradScaler("cpu"))
    guard = NanGuard()
    for _ in range(MAX_SCALER_SKIPS):
        guard.on_before_optimizer_step(scaled, None, inf)  # the scaler skips the step and lowers its scale
    guard.on_before_optimizer_step(scaled, None, _optimizer(torch.ones(2)))  # a finite step resets the count
    for _ in range(MAX_SCALER_SKIPS):
        guard.on_before_optimizer_step(scaled, None, inf)
    with pytest.raises(NonFiniteLossError, match=f"{MAX_SCALER_SKIPS} steps in a row"):
        guard.on_before_optimizer_step(scaled, None, inf)
