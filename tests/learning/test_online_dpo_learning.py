"""Online DPO learns on the real SmolLM2-135M-Instruct: the reward on held-out prompts rises.

The task is test_rl_learning.py's (single-digit additions, "What is 3 + 4?"), split by the pair of
digits: 16 pairs are held out, training draws from the other 65. The reward is the built-in answer
accuracy plus a brevity term (minus the completion's characters / 100), which breaks most ties
between two wrong or two right answers, so nearly every pair ranks from the first step (Online DPO
learns nothing from a tied pair). LoRA with a high learning rate.

The measure is not the training rollouts' reward (two samples per prompt, four prompts a step: noisy)
but `pmetal.rl.evaluate.evaluate_prompts` on the held-out prompts before and after training, at the
rollout's temperature with EVAL_SAMPLES completions per prompt and the same sampling seed both times.
Calibration (2026-12-07, this machine): at lr 5e-4 the held-out reward rose from -0.270 to 0.603
(+0.87) and the accuracy from 0.125 to 0.773; the control at lr 1e-7 (no learning) went from -0.270
to -0.269 and 0.125 to 0.125. The margins (0.4 reward, 0.3 accuracy) sit between the two;
`PMETAL_ONLINE_DPO_CONTROL=1` runs the control here too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import lightning as L
import pytest
import torch

pytestmark = pytest.mark.slow

STEPS = 8
EVAL_SAMPLES = 8  # completions per held-out prompt
MARGIN = 0.4  # held-out mean reward after - before (learning: +0.87, control: +0.001)
ACCURACY_MARGIN = 0.3  # held-out accuracy after - before (learning: +0.65, control: 0.0)


def brevity(prompts, completions, **columns):
    return [-len(c) / 100 for c in completions]


@pytest.fixture(scope="module")
def split_additions(tmp_path_factory):
    """(train, held-out) prompt files: additions of two digits 1-9, 16 digit pairs held out."""
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    rng = random.Random(0)
    rng.shuffle(pairs)
    held, train = pairs[:16], pairs[16:]
    root = tmp_path_factory.mktemp("online-dpo")
    row = lambda a, b: json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})  # noqa: E731
    (root / "train.jsonl").write_text("\n".join(row(*rng.choice(train)) for _ in range(256)) + "\n")
    (root / "held.jsonl").write_text("\n".join(row(a, b) for a, b in held) + "\n")
    return root / "train.jsonl", root / "held.jsonl"


def held_out_metrics(module, held_path) -> dict[str, float]:
    """`evaluate_prompts` on every held-out prompt: EVAL_SAMPLES completions each, a fixed sampling seed."""
    from pmetal.data.prompts import PromptDataModule
    from pmetal.rl.evaluate import evaluate_prompts

    data = PromptDataModule(str(held_path), batch_size=16, seed=0, tokenizer=module.tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    # uncompiled: the same samples (checked: identical metrics), without a CPU inductor compile (175 s -> 80 s here)
    settings = dataclasses.replace(module.rollout_settings(), num_generations=EVAL_SAMPLES, compile_decode=False)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return evaluate_prompts(module.policy, module.tokenizer, module.rewards, settings, batch)


def run(smollm2_dir, split_additions, learning_rate: float) -> tuple[dict, dict]:
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.online_dpo import OnlineDpoModule

    train_path, held_path = split_additions
    L.seed_everything(0)
    module = OnlineDpoModule(str(smollm2_dir), reward_fns=["accuracy", brevity], max_completion_length=12,
                             temperature=0.7, micro_batch_size=8, beta=0.1, learning_rate=learning_rate,
                             lr_schedule="constant", lora_r=16, gradient_checkpointing=False, max_grad_norm=1.0)
    before = held_out_metrics(module, held_path)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, PromptDataModule(str(train_path), batch_size=4, seed=0))
    after = held_out_metrics(module.cpu(), held_path)
    print(f"lr {learning_rate:g}: held-out reward {before['reward']:.3f} -> {after['reward']:.3f}, "
          f"accuracy {before.get('accuracy', float('nan')):.3f} -> {after.get('accuracy', float('nan')):.3f}, "
          f"mean length {before['completions/mean_length']:.1f} -> {after['completions/mean_length']:.1f}")
    return before, after


def test_online_dpo_raises_the_held_out_reward(smollm2_dir, split_additions):
    before, after = run(smollm2_dir, split_additions, learning_rate=5e-4)
    assert after["reward"] > before["reward"] + MARGIN, (before, after)
    assert after["accuracy"] > before["accuracy"] + ACCURACY_MARGIN, (before, after)


@pytest.mark.skipif(not os.environ.get("PMETAL_ONLINE_DPO_CONTROL"), reason="the calibration's control run")
def test_online_dpo_without_learning_does_not_meet_the_margin(smollm2_dir, split_additions):
    before, after = run(smollm2_dir, split_additions, learning_rate=1e-7)
    assert after["reward"] <= before["reward"] + MARGIN, (before, after)
    assert after["accuracy"] <= before["accuracy"] + ACCURACY_MARGIN, (before, after)
