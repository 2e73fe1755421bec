"""Async rewards: the same rollout as scoring in line; async def rewards; a failing reward is named
with its prompt and leaves no worker behind; GRPO's new rollout settings are checked up front; whole
steps whose reference forward and update overlap the scoring give bit-identical results."""

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


# ---------------------------------------------------------------------------------------------
# The whole step: the reference forward and the update overlap the scoring of the last chunk
# ---------------------------------------------------------------------------------------------

EVENTS: list[tuple[str, float]] = []  # (what, time.perf_counter()) of the run in progress
CALLS: list[list[str]] = []  # the prompts of each scoring call of the run in progress
FAILING: set[str] = set()  # the second chunk's prompts, once it holds a "fail..." prompt: the reward raises on them


def slow_second_chunk(prompts, completions, **kwargs):
    """Slow on the second chunk of each step, so the first chunk's update can run meanwhile."""
    import time

    CALLS.append(list(prompts))
    if len(CALLS) % 2 == 0:
        time.sleep(0.4)
        if any(p.startswith("fail") for p in prompts):
            FAILING.update(prompts)
    if FAILING.intersection(prompts):
        raise ValueError("the judge is down")
    EVENTS.append(("scored", time.perf_counter()))
    return [float(len(c) % 3) for c in completions]


def _timed_grpo():
    import time

    from pmetal.modules.grpo import GrpoModule

    class TimedGrpo(GrpoModule):
        def reference_logps(self, *args, **kwargs):
            EVENTS.append(("reference", time.perf_counter()))
            return super().reference_logps(*args, **kwargs)

        def micro_batch_loss(self, *args, **kwargs):
            EVENTS.append(("update", time.perf_counter()))
            return super().micro_batch_loss(*args, **kwargs)

    return TimedGrpo


def _fit_grpo(tiny_model_dir, tmp_path, prompts: list[str], *, async_rewards: bool):
    """2 rollouts of 4 prompts in 2 chunks, KL to the reference, 2 optimizer steps each; what they gave."""
    import json

    import lightning as L

    from pmetal.cli.runner import build_trainer, fit
    from pmetal.data.prompts import PromptDataModule

    class Record(L.Callback):
        def __init__(self):
            self.rollouts = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            r = batch["rollout"]
            self.rollouts.append((r.rewards.clone(), r.advantages.clone(), r.ref_logps.clone(), dict(r.metrics)))

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    run = tmp_path / ("async" if async_rewards else "inline")
    L.seed_everything(0, verbose=False)
    for log in (EVENTS, CALLS, FAILING):
        log.clear()
    module = _timed_grpo()(str(tiny_model_dir), reward_fns=[slow_second_chunk], num_generations=2,
                           max_completion_length=4, micro_batch_size=2, rollout_chunks=2, beta=0.1,
                           num_iterations=2, learning_rate=1e-2, lora_dropout=0.1, gradient_checkpointing=False,
                           async_rewards=async_rewards, max_grad_norm=1.0)
    record = Record()
    trainer = build_trainer(run, accelerator="cpu", precision="32-true", max_steps=4, max_epochs=None,
                            enable_progress_bar=False, logger=False, callbacks=[record], gradient_clip_val=None)
    fit(trainer, module, PromptDataModule(str(data), batch_size=4))
    weights = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    history = json.loads((run / "loss_history.json").read_text())["train"]
    return record.rollouts, history, weights, list(EVENTS)


def test_async_rewards_overlap_the_reference_and_update_and_change_nothing(tiny_model_dir, tmp_path):
    prompts = ["Say hi.", "Count to 3.", "Name a colour.", "Say bye."]
    inline = _fit_grpo(tiny_model_dir, tmp_path, prompts, async_rewards=False)
    background = _fit_grpo(tiny_model_dir, tmp_path, prompts, async_rewards=True)
    # bit for bit: rewards, advantages, reference log-probs, every step's loss, the final weights
    assert len(inline[0]) == len(background[0]) == 2
    for (r1, a1, ref1, _), (r2, a2, ref2, _) in zip(inline[0], background[0]):
        assert torch.equal(r1, r2) and torch.equal(a1, a2) and torch.equal(ref1, ref2)
    assert [s for s, _ in inline[1]] == [s for s, _ in background[1]] == [2, 4]
    assert [v for _, v in inline[1]] == [v for _, v in background[1]]
    assert inline[2].keys() == background[2].keys() and inline[2]
    for name in inline[2]:
        assert torch.equal(inline[2][name], background[2][name]), name
    # in line every reward is in before the reference forward; in the background the reference forward
    # and the first chunk's update run while the second chunk is still scored
    for events, overlapped in ((inline[3], False), (background[3], True)):
        last_score = [t for what, t in events if what == "scored"][1]  # the first step's second chunk
        reference = next(t for what, t in events if what == "reference")
        update = next(t for what, t in events if what == "update")
        assert (reference < last_score and update < last_score) == overlapped, events
    metrics = background[0][0][3]
    for side in ("generation", "reference", "update", "rewards", "reward_wait", "step"):
        assert metrics[f"rollout/{side}_seconds"] >= 0.0, side
    assert metrics["rollout/rewards_seconds"] >= 0.4 and metrics["rollout/reference_seconds"] > 0.0
    assert metrics["rollout/step_seconds"] >= metrics["rollout/generation_seconds"] + metrics["rollout/update_seconds"]


def test_a_reward_failing_during_the_update_names_itself_and_leaves_no_worker(tiny_model_dir, tmp_path):
    prompts = ["fail: say hi.", "fail: count to 3.", "fail: name a colour.", "fail: say bye."]
    with pytest.raises(PmetalError, match=r"reward function 'slow_second_chunk' raised ValueError: the judge is down "
                                          r"\(prompt 2 of the step, completion 0\)"):
        _fit_grpo(tiny_model_dir, tmp_path, prompts, async_rewards=True)
    assert "update" in [what for what, _ in EVENTS]  # the first chunk's update had begun when the worker failed
    assert not [t for t in threading.enumerate() if t.name.startswith("pmetal-rewards")]
