"""Async rewards: the same rollout as scoring in line; async def rewards; a failing reward is named
with its prompt and leaves no worker behind; GRPO's new rollout settings are checked up front."""

from __future__ import annotations

import threading

import pytest
import torch

from pmetal.callbacks.rollout import make_rollout
from pmetal.errors import PmetalError

from tests.unit.test_rollout import _prompt_batch


def parity_reward(prompts, completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


async def async_length_reward(prompts, completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def grpo(tiny_model_dir):
    from pmetal.modules.grpo import GrpoModule

    return GrpoModule(str(tiny_model_dir), reward_fns=[parity_reward, async_length_reward], num_generations=4,
                      max_completion_length=6, micro_batch_size=4, rollout_chunks=2, gradient_checkpointing=False)


def _rollout(grpo, texts, *, async_rewards: bool):
    grpo.hparams.async_rewards = async_rewards
    torch.manual_seed(3)
    return make_rollout(grpo, _prompt_batch(grpo, texts))


def test_async_scoring_gives_the_same_rollout_and_loss(grpo):
    texts = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to 3."]
    inline = _rollout(grpo, texts, async_rewards=False)
    background = _rollout(grpo, texts, async_rewards=True)
    assert inline.input_ids.tolist() == background.input_ids.tolist()
    assert torch.equal(inline.rewards, background.rewards) and torch.equal(inline.advantages, background.advantages)
    torch.testing.assert_close(inline.old_logps, background.old_logps, atol=0, rtol=0)
    expected = torch.tensor([len(c) % 2 + len(c) / 10.0 for c in inline.completions])  # the async def one ran
    torch.testing.assert_close(inline.rewards, expected)
    with torch.no_grad():
        losses = [[float(grpo.micro_batch_loss(p, r.num_sequences, r.num_completion_tokens)[0])
                   for p in r.micro_batches(4)] for r in (inline, background)]
    assert losses[0] == losses[1]
    for name in ("rollout/generation_seconds", "rollout/rewards_seconds", "rollout/reward_wait_seconds"):
        assert name in background.metrics


def test_a_failing_reward_names_itself_and_the_prompt(grpo):
    def picky(prompts, completions, **kwargs):
        if any("colour" in str(p) for p in prompts):
            raise ValueError("no colours")
        return [0.0] * len(completions)

    picky.__name__ = "picky"
    saved = grpo.rewards
    from pmetal.rewards import RewardSet

    grpo.rewards = RewardSet([parity_reward, picky], [1.0, 1.0])
    try:
        for async_rewards in (False, True):
            with pytest.raises(PmetalError, match=r"reward function 'picky' raised ValueError: no colours \(prompt 3 "):
                _rollout(grpo, ["Say hi.", "Count.", "Go.", "Name a colour."], async_rewards=async_rewards)
    finally:
        grpo.rewards = saved
    assert not [t for t in threading.enumerate() if t.name.startswith("pmetal-rewards")]


def test_rollout_settings_are_checked_before_loading(tiny_model_dir):
    from pmetal.modules.grpo import GrpoModule

    with pytest.raises(PmetalError, match="num_draft_tokens must be at least 1"):
        GrpoModule("/nonexistent/model", reward_fns=[parity_reward], speculative=True, num_draft_tokens=0)
    with pytest.raises(PmetalError, match="only used with speculative"):
        GrpoModule("/nonexistent/model", reward_fns=[parity_reward], draft_model=str(tiny_model_dir))
    with pytest.raises(PmetalError, match="rollout_chunks"):
        GrpoModule("/nonexistent/model", reward_fns=[parity_reward], rollout_chunks=0)


def test_rollout_flags_on_a_command_without_rollouts_are_refused(capsys):
    from pmetal.cli.dispatch import main

    assert main(["sft", "--speculative", "--dataset", "x.jsonl"]) == 2
    assert "--speculative applies to commands that sample rollouts" in capsys.readouterr().err
    assert main(["dpo", "--num-draft-tokens=2"]) == 2
    assert "--num-draft-tokens applies" in capsys.readouterr().err


def test_grpo_command_passes_the_engine_flags():
    import argparse

    from pmetal.cli.commands.grpo import FLAGS, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--speculative", "--num-draft-tokens", "3", "--async-rewards",
                         "--importance-sampling-level", "sequence"])
    kwargs = FLAGS.resolve(args, "grpo").model  # the GrpoModule keyword arguments the command builds
    assert (kwargs["speculative"], kwargs["num_draft_tokens"], kwargs["async_rewards"]) == (True, 3, True)
    assert kwargs["importance_sampling_level"] == "sequence" and kwargs["draft_model"] is None


def test_grpo_speculative_rollout_with_a_draft_model(tiny_model_dir):
    from pmetal.modules.grpo import GrpoModule

    module = GrpoModule(str(tiny_model_dir), reward_fns=[parity_reward], num_generations=2, max_completion_length=8,
                        speculative=True, draft_model=str(tiny_model_dir), num_draft_tokens=3,
                        temperature=0.0, gradient_checkpointing=False)
    module.setup("fit")  # loads the draft beside the policy
    assert module.draft is not None and not any(p.requires_grad for p in module.draft.parameters())
    assert "draft" not in dict(module.named_children())  # never trained, never saved with the policy
    rollout = make_rollout(module, _prompt_batch(module, ["Say hi.", "Count."]))
    # the draft is the policy's own base (the adapter starts at zero): every draft is accepted
    assert rollout.metrics["speculative/acceptance_rate"] == pytest.approx(1.0)
    assert rollout.metrics["speculative/tokens_per_forward"] > 1.0
