"""Online DPO and XPO learn on the real SmolLM2-135M-Instruct: the mean reward of the policy's samples rises.

The task and reward are test_rl_learning.py's (single-digit additions; answer accuracy plus the soft
overlong punishment): a pair's two completions often differ in reward from the first step, so
most pairs rank. LoRA with a high learning rate; the mean reward of the last steps must clearly
exceed that of the first steps.
"""

from __future__ import annotations

import lightning as L
import pytest

from tests.learning.test_rl_learning import RewardHistory, additions  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

SETTINGS = dict(reward_fns=["accuracy", "overlong"], max_completion_length=16, temperature=0.7, micro_batch_size=16,
                beta=0.1, learning_rate=3e-4, lr_schedule="constant", lora_r=16, gradient_checkpointing=False)


def _fit(module, data_path, steps: int = 10, prompts: int = 8):
    from pmetal.data.prompts import PromptDataModule

    history = RewardHistory()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[history])
    trainer.fit(module, PromptDataModule(str(data_path), batch_size=prompts, seed=0))
    return history


def _assert_learned(history, margin: float):
    first, last = sum(history.rewards[:3]) / 3, sum(history.rewards[-3:]) / 3
    print(f"mean reward: first 3 steps {first:.3f} -> last 3 steps {last:.3f}; accuracy {history.accuracy}")
    assert last > first + margin, history.rewards


def test_online_dpo_raises_the_reward(smollm2_dir, additions):  # noqa: F811
    from pmetal.modules.online_dpo import OnlineDpoModule

    L.seed_everything(0)
    history = _fit(OnlineDpoModule(str(smollm2_dir), **SETTINGS), additions)
    _assert_learned(history, margin=0.2)
