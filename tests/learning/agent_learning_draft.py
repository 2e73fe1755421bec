"""An agent learns to use a tool on the real SmolLM2-135M-Instruct: SFT on tool traces, then GRPO with tools.

The task (examples/agent_tools.py): "what is the secret code of <invented name>?", whose answer
exists only in the `lookup` tool. A brief, partial SFT on the example traces
(examples/data/tool_sft.jsonl) teaches the call format without making it a habit; its adapter is
merged, and GRPO with `tools=[lookup]` over the example prompts (examples/data/tool_grpo.jsonl,
rewards `code_reward` + `called_lookup`) must then raise both the rate of correct calls (lookup
with the asked name) and the episode reward. Each GRPO step's metrics come from its own rollout,
before its update, so the first steps measure the SFT model and the last ones the GRPO-trained one.

DRAFT, not collected by pytest (no test_ prefix): it has not yet run to completion on an idle
machine, so its settings and thresholds are unconfirmed. Rename it to test_agent_learning.py once a
run passes with the margins below, and record its numbers and time in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import lightning as L
import pytest

pytestmark = pytest.mark.slow

TOOLS = "pmetal.examples.agent_tools:"
# A partial SFT so that the correct-call rate starts above 0 but well below 1 (GRPO needs groups
# whose rewards differ); 6 GRPO steps of 2 prompts x 4 episodes at 1e-3. Unconfirmed guesses: 2
# steps at 5e-4 gave no correct call and turns cut at 32 tokens (benchmarks/RESULTS.md, issue 28).
SFT_STEPS, SFT_LR = 4, 1e-3
GRPO_STEPS, GRPO_LR = 6, 1e-3
MAX_TURN_TOKENS = 48  # a call turn alone is about 33 tokens
# Means over the first and last WINDOW steps (8 episodes each, 16 per window): the difference of two
# 16-draw rates has a standard deviation of about 0.18 at p = 0.5, so MARGIN is two of them and an
# unchanged rate clears it by chance in about 2% of runs.
WINDOW, MARGIN = 2, 0.35
START_CEILING = 0.75  # the SFT model's correct-call rate must leave GRPO room to move it


class EpisodeHistory(L.Callback):
    def __init__(self):
        self.reward: list[float] = []
        self.correct_calls: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = batch["rollout"].metrics
        self.reward.append(metrics["reward"])
        self.correct_calls.append(metrics["rewards/called_lookup/mean"])


def _trainer(steps, callbacks=()):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                     callbacks=list(callbacks))


def _partial_sft(smollm2_dir, out):
    """A few LoRA steps on the tool traces, merged into the base (GRPO trains a new adapter on it)."""
    from pmetal.data.datamodule import SftDataModule
    from pmetal.data.formats import example_path
    from pmetal.modules.sft import SftModule

    module = SftModule(str(smollm2_dir), learning_rate=SFT_LR, lr_schedule="constant", lora_r=8,
                       gradient_checkpointing=False)
    _trainer(SFT_STEPS).fit(module, SftDataModule(path=str(example_path("tool_sft.jsonl")), batch_size=4,
                                                  max_seq_len=256, val_fraction=0.0))
    merged = module.policy.merge_and_unload()
    merged.save_pretrained(out)
    module.tokenizer.save_pretrained(out)
    return out


def test_sft_then_grpo_with_tools_raises_correct_calls_and_episode_reward(smollm2_dir, tmp_path):
    from pmetal.data.formats import example_path
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.agent import AgentGrpoModule

    L.seed_everything(0)
    model = _partial_sft(smollm2_dir, tmp_path / "sft-merged")
    module = AgentGrpoModule(str(model), tools=[TOOLS + "lookup"], max_tool_turns=1,
                             reward_fns=[TOOLS + "code_reward", TOOLS + "called_lookup"], num_generations=4,
                             max_completion_length=MAX_TURN_TOKENS, temperature=1.0, micro_batch_size=16,
                             learning_rate=GRPO_LR, lr_schedule="constant", lora_r=16, gradient_checkpointing=False)
    history = EpisodeHistory()
    _trainer(GRPO_STEPS, [history]).fit(module, PromptDataModule(str(example_path("tool_grpo.jsonl")),
                                                                 batch_size=2, seed=0))
    first, last = slice(0, WINDOW), slice(GRPO_STEPS - WINDOW, GRPO_STEPS)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"correct calls per step {history.correct_calls}; episode reward per step {history.reward}")
    assert mean(history.correct_calls[first]) <= START_CEILING, "the SFT step alone already saturated the calls"
    assert mean(history.correct_calls[last]) >= mean(history.correct_calls[first]) + MARGIN, history.correct_calls
    assert mean(history.reward[last]) >= mean(history.reward[first]) + MARGIN, history.reward
