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


def test_grpo_clips_the_unscaled_gradients_under_16_mixed(tiny_model_dir, tmp_path):
    """GRPO steps its optimizer itself; under a gradient scaler the clip must come after the unscale,
    or it clips the gradients times 2^16 and the update shrinks by the scale."""
    import lightning as L

    from pmetal.cli.runner import build_trainer
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule
    from tests.method_matrix import crc_reward

    L.seed_everything(0, verbose=False)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?"}) + "\n" for i in range(4)))
    module = GrpoModule(str(tiny_model_dir), reward_fns=[crc_reward], num_generations=4, max_completion_length=4,
                        micro_batch_size=8, learning_rate=1e-3, gradient_checkpointing=False, max_grad_norm=1.0)
    norms: list[float] = []

    class StepNorms(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def record(optimizer, args, kwargs):  # inside scaler.step: the gradients the update uses
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            trainer.optimizers[0].register_step_pre_hook(record)

    trainer = build_trainer(tmp_path / "run", accelerator="cpu", precision="16-mixed", max_steps=3, max_epochs=None,
                            gradient_clip_val=None, enable_progress_bar=False, logger=False, callbacks=[StepNorms()])
    trainer.fit(module, datamodule=PromptDataModule(str(data), batch_size=2))
    assert norms, "the scaler skipped every step"
    assert all(1e-3 < n <= 1.0 + 1e-4 for n in norms), norms  # clipped to 1, not to 1 / 2^16
