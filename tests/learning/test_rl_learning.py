"""GRPO, DAPO, RLOO, RLKD and GRPO's loss variants learn on the real SmolLM2-135M-Instruct: the mean reward rises.

The task: single-digit additions ("What is 3 + 4?"). At temperature 0.7 the base model answers
about a quarter of them correctly within 16 tokens (it often rambles past the limit or gets the
sum wrong), so groups have a reward spread from the first step. The reward is the built-in answer
accuracy plus DAPO's soft overlong punishment (brevity shaping, 0 for short answers, down to -1
at the limit). LoRA with a high learning rate; the mean reward of the last steps must clearly
exceed that of the first steps.
"""

from __future__ import annotations

import json
import random

import lightning as L
import pytest
import torch

pytestmark = pytest.mark.slow

# 6 steps (10 before: CI time). Measured with these seeds, first 3 -> last 3 steps' mean reward: GRPO
# -0.38 -> 0.06, DAPO -0.21 -> 0.26, RLOO -0.34 -> 0.08, RLKD -0.38 -> -0.01 (its bar 0.15); at 10 steps
# GRPO reached 0.66. CISPO rose only 0.17 in 6 steps, so it keeps 10.
STEPS = 6
SETTINGS = dict(reward_fns=["accuracy", "overlong"], num_generations=4, max_completion_length=16, temperature=0.7,
                micro_batch_size=16, learning_rate=3e-4, lr_schedule="constant", lora_r=16,
                gradient_checkpointing=False, max_grad_norm=1.0)


class RewardHistory(L.Callback):
    def __init__(self):
        self.rewards: list[float] = []
        self.accuracy: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = batch["rollout"].metrics
        self.rewards.append(metrics["reward"])
        self.accuracy.append(metrics["rewards/accuracy/mean"])


@pytest.fixture(scope="module")
def additions(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("rl") / "additions.jsonl"
    rows = []
    for _ in range(256):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _fit(module, data_path, steps=STEPS):
    from pmetal.data.prompts import PromptDataModule

    history = RewardHistory()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[history])
    trainer.fit(module, PromptDataModule(str(data_path), batch_size=4, seed=0))
    return history


def _assert_learned(history, margin=0.2):
    first = sum(history.rewards[:3]) / 3
    last = sum(history.rewards[-3:]) / 3
    print(f"mean reward: first 3 steps {first:.3f} -> last 3 steps {last:.3f}; rewards {history.rewards}; "
          f"accuracy {history.accuracy}")
    assert last > first + margin, history.rewards


def test_grpo_raises_the_reward(smollm2_dir, additions):
    from pmetal.modules.grpo import GrpoModule

    L.seed_everything(0)
    history = _fit(GrpoModule(str(smollm2_dir), **SETTINGS), additions)
    _assert_learned(history)


def test_dapo_with_dynamic_sampling_raises_the_reward(smollm2_dir, additions):
    from pmetal.modules.grpo import DapoModule

    L.seed_everything(0)
    settings = dict(SETTINGS, reward_fns=["accuracy"], max_sampling_rounds=2)  # DAPO adds "overlong" itself
    history = _fit(DapoModule(str(smollm2_dir), **settings), additions)
    _assert_learned(history)


def test_rlkd_raises_the_reward(smollm2_dir, additions):
    """The teacher is the same base model: the distillation term keeps the student near it while the
    GRPO term (weight 1 - alpha) raises the reward."""
    from pmetal.modules.rlkd import RlkdModule

    L.seed_everything(0)
    module = RlkdModule(str(smollm2_dir), teacher_model=str(smollm2_dir), alpha=0.1, **SETTINGS)
    history = _fit(module, additions)
    _assert_learned(history, margin=0.15)
    assert torch.isfinite(torch.tensor(history.rewards)).all()


def test_rloo_raises_the_reward(smollm2_dir, additions):
    from pmetal.modules.grpo import RlooModule

    L.seed_everything(0)
    history = _fit(RlooModule(str(smollm2_dir), **SETTINGS), additions)
    _assert_learned(history)


def test_cispo_with_truncated_importance_sampling_and_entropy_mask_raises_the_reward(smollm2_dir, additions):
    """CISPO's REINFORCE term on the top half of the tokens by entropy, weighted by the truncated
    trainer/sampler ratio, with REINFORCE++'s batch-normalized advantages: the reward still rises."""
    from pmetal.modules.grpo import GrpoModule

    L.seed_everything(0)
    module = GrpoModule(str(smollm2_dir), loss_type="cispo", tis_cap=2.0, top_entropy_quantile=0.5,
                        advantage_estimator="reinforce_pp", **SETTINGS)
    history = _fit(module, additions, steps=10)  # 6 steps: -0.42 -> -0.24, under the bar
    _assert_learned(history)
