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
