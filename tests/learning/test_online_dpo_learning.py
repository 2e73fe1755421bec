"""Online DPO learns on the real SmolLM2-135M-Instruct: the mean reward of the policy's samples rises.

The task is test_rl_learning.py's (single-digit additions, "What is 3 + 4?"); the reward is the
built-in answer accuracy plus a brevity term (minus the completion's characters / 100), which
breaks most ties between two wrong or two right answers, so nearly every pair ranks from the first
step (Online DPO learns nothing from a tied pair). LoRA with a high learning rate; the mean reward
of the last steps must clearly exceed that of the first steps.
"""

from __future__ import annotations

import lightning as L
import pytest

from tests.learning.test_rl_learning import RewardHistory, additions  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

STEPS = 8


def brevity(prompts, completions, **columns):
    return [-len(c) / 100 for c in completions]


def test_online_dpo_raises_the_reward(smollm2_dir, additions):  # noqa: F811
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.online_dpo import OnlineDpoModule

    L.seed_everything(0)
    module = OnlineDpoModule(str(smollm2_dir), reward_fns=["accuracy", brevity], max_completion_length=12,
                             temperature=0.7, micro_batch_size=8, beta=0.1, learning_rate=5e-4, lr_schedule="constant",
                             lora_r=16, gradient_checkpointing=False, max_grad_norm=1.0)
    history = RewardHistory()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[history])
    trainer.fit(module, PromptDataModule(str(additions), batch_size=4, seed=0))
    first, last = sum(history.rewards[:3]) / 3, sum(history.rewards[-3:]) / 3
    print(f"mean reward: first 3 steps {first:.3f} -> last 3 steps {last:.3f}; accuracy {history.accuracy}; "
          f"rewards {history.rewards}")
    assert len(history.rewards) == STEPS
    assert last > first + 0.1, history.rewards
