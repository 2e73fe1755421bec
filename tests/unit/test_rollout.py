"""Rollouts (generate -> reward -> advantages -> batch), dynamic sampling, and prompt datasets."""

from __future__ import annotations

import json

import pytest
import torch

from pmetal.callbacks.rollout import RolloutCallback, make_rollout
from pmetal.data.prompts import PromptDataModule, collate_prompts, row_to_prompt
from pmetal.errors import DataError, PmetalError


def length_parity_reward(prompts, completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


@pytest.fixture(scope="module")
def grpo(tiny_model_dir):
    from pmetal.modules.grpo import GrpoModule

    torch.manual_seed(0)
    return GrpoModule(str(tiny_model_dir), reward_fns=[length_parity_reward], num_generations=4,
                      max_completion_length=6, micro_batch_size=3, gradient_checkpointing=False)


def _prompt_batch(module, texts, **columns):
    from pmetal.data.render import render_prompt

    items = [{"prompt_ids": render_prompt(module.tokenizer, [{"role": "user", "content": t}]), "prompt": t,
              "columns": {k: v[i] for k, v in columns.items()}, "index": i} for i, t in enumerate(texts)]
    return collate_prompts(items)


def test_rollout_layout_logps_and_advantages(grpo):
    torch.manual_seed(1)
    batch = _prompt_batch(grpo, ["What is 2+2?", "Name a colour."])
    rollout = make_rollout(grpo, batch)
    assert rollout.num_sequences == 8 and rollout.group_size == 4
    # each row: prompt then completion, labels only on the completion
    for r in range(8):
        prompt = batch["prompt_ids"][r // 4]
        p = len(prompt)
        assert rollout.input_ids[r, :p].tolist() == prompt
        assert (rollout.labels[r, :p] == -100).all()
        n = int(rollout.completion_mask[r].sum())
        assert 1 <= n <= 6
        assert rollout.labels[r, p : p + n].tolist() == rollout.input_ids[r, p : p + n].tolist()
    # advantages are centered within each group
    assert torch.allclose(rollout.advantages.view(2, 4).sum(1), torch.zeros(2), atol=1e-4)
    # the update's log-probs of the sampled tokens equal the sampling-time ones (ratio 1 at the start)
    grpo.policy.train()
    with torch.no_grad():
        for part in rollout.micro_batches(3):
            now = grpo.token_logps(part)
            mask = part["labels"] != -100
            torch.testing.assert_close(now[mask], part["old_logps"][mask], atol=2e-4, rtol=1e-4)
    for key in ("reward", "reward_std", "rewards/length_parity_reward/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/min_length", "completions/max_length", "completions/clipped_ratio"):
        assert key in rollout.metrics
    rewards = torch.tensor([len(c) % 2 for c in rollout.completions], dtype=torch.float32)
    assert rollout.metrics["reward"] == pytest.approx(float(rewards.mean()))


class _Source:
    def __init__(self, module, texts):
        self.module, self.texts, self.calls = module, texts, 0

    def sample(self, n):
        self.calls += 1
        return _prompt_batch(self.module, self.texts[:n])


def test_dynamic_sampling_drops_flat_groups_and_draws_more(grpo):
    def reward(prompts, completions, **kw):  # flat (all 0) for the "flat" prompts, spread otherwise
        return [0.0 if "flat" in p else float(i % 2) for i, p in enumerate(prompts)]

    from pmetal.rewards import RewardSet

    original = grpo.rewards
    grpo.rewards = RewardSet([reward])
    grpo.hparams.dynamic_sampling = True
    grpo.hparams.max_completion_length = 2  # short: this test is about the sampling rounds
    grpo.hparams.max_sampling_rounds = 3
    try:
        source = _Source(grpo, ["good one", "good two"])
        torch.manual_seed(0)
        rollout = make_rollout(grpo, _prompt_batch(grpo, ["flat a", "flat b"]), source=source)
        assert source.calls == 1
        assert rollout.metrics["dynamic_sampling/rounds"] == 2.0
        assert rollout.metrics["dynamic_sampling/dropped_groups"] == 2.0
        assert rollout.num_sequences == 8
        assert (rollout.rewards.view(2, 4).std(1) > 0).all()
        # every group flat and no more prompts: bounded rounds, an empty rollout
        never = _Source(grpo, ["flat c", "flat d"])
        empty = make_rollout(grpo, _prompt_batch(grpo, ["flat a", "flat b"]), source=never)
        assert never.calls == grpo.hparams.max_sampling_rounds - 1
        assert empty.num_sequences == 0 and empty.metrics["dynamic_sampling/kept_groups"] == 0.0
    finally:
        grpo.rewards = original
        grpo.hparams.dynamic_sampling = False
        grpo.hparams.max_completion_length = 6
        grpo.hparams.max_sampling_rounds = 4


def test_callback_rejects_a_batch_that_is_not_prompts(grpo):
    with pytest.raises(TypeError, match="PromptDataModule"):
        RolloutCallback().on_train_batch_start(None, grpo, {"input_ids": torch.zeros(1, 2)}, 0)


# ---------------------------------------------------------------------------------------------
# prompt datasets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, prompt_text, columns",
    [
        ({"prompt": "2+2?", "answer": "4"}, "2+2?", {"answer": "4"}),
        ({"question": "2+2?", "answer": "#### 4"}, "2+2?", {"answer": "#### 4"}),
        ({"problem": "2+2?", "thinking": "add", "solution": "\\boxed{4}"}, "2+2?", {"solution": "\\boxed{4}"}),
        ({"instruction": "Add", "input": "2 and 2", "output": "4"}, "Add\n\n2 and 2", {"solution": "4"}),
        ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, "2+2?",
         {"solution": "4"}),
        ({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "id": 7}, "2+2?",
         {"solution": "4", "id": 7}),
    ],
)
def test_prompt_layouts_never_leak_the_solution(row, prompt_text, columns):
    original, messages, cols = row_to_prompt([row], 0, path="d.jsonl")
    assert messages[-1] == {"role": "user", "content": prompt_text}
    assert cols == columns
    for value in columns.values():
        assert all(str(value) not in m["content"] or str(value) in prompt_text for m in messages)


def test_prompt_errors_name_file_row_and_field(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl, row 1: no prompt in this row \(columns: answer, text\)"):
        row_to_prompt([{"text": "x", "answer": "1"}], 0, path="d.jsonl")
    with pytest.raises(DataError, match="field 'prompt'.*value is empty"):
        row_to_prompt([{"prompt": " "}], 0, path="d.jsonl")
    with pytest.raises(DataError, match="no user message"):
        row_to_prompt([{"messages": [{"role": "assistant", "content": "4"}]}], 0, path="d.jsonl")


def test_prompt_datamodule_batches_and_sample(tmp_path, grpo):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(5)) + "\n")
    dm = PromptDataModule(str(path), batch_size=2, tokenizer=grpo.tokenizer, max_prompt_length=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt_ids"]) == 2 and set(batch["columns"]) == {"answer"}
    assert all(len(ids) <= 8 for ids in batch["prompt_ids"])  # truncated from the left
    more = dm.sample(3)
    assert len(more["prompts"]) == 3 and len(more["columns"]["answer"]) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"nothing": 1}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        PromptDataModule(str(bad), tokenizer=grpo.tokenizer).setup("fit")


def test_grpo_without_reward_is_a_clear_error(tiny_model_dir):
    from pmetal.modules.grpo import GrpoModule

    with pytest.raises(PmetalError, match="no reward function"):
        GrpoModule(str(tiny_model_dir))
