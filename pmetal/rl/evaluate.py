"""Held-out evaluation of an online method during training: reward and accuracy on held-out prompts.

The prompts are sampled through the same :class:`pmetal.rl.sampler.RolloutSampler` as training, at
the rollout's temperature with ``num_generations`` completions each (so pass@k is measured on the
distribution being trained, and costs no extra sampling), with dynamic sampling and async scoring
off. Accuracy and pass@k are ``pmetal eval``'s (``pmetal.evaluation.sampling.answer_metrics``: the
answer/solution column against the completion's final answer), reported when the prompts have answers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pmetal.evaluation.sampling import answer_metrics, has_answers
from pmetal.rl.prompts import PromptBatch
from pmetal.rl.sampler import RolloutSampler
from pmetal.rl.settings import RolloutSettings


def evaluate_prompts(model, tokenizer, rewards, settings: RolloutSettings, batch) -> dict[str, float]:
    """:func:`held_out_metrics` of one batch of held-out prompts under the training rollout's settings."""
    import torch

    sampler = RolloutSampler(model, tokenizer, rewards, eval_settings(settings))
    # Lightning validates under inference mode; the engine's buffers outlive the call and are
    # written again by training rollouts, so they must be ordinary tensors
    with torch.inference_mode(False), torch.no_grad():
        return held_out_metrics(sampler, batch)


def eval_settings(settings: RolloutSettings) -> RolloutSettings:
    """The training rollout's settings for held-out prompts: every group kept, scored in line."""
    return dataclasses.replace(settings, dynamic_sampling=False, async_rewards=False, chunks=1)


def held_out_metrics(sampler: RolloutSampler, batch: PromptBatch | dict[str, Any]) -> dict[str, float]:
    """`reward`, `rewards/<function>/mean`, `completions/mean_length` and, with answers, `accuracy`
    and `pass@k` of one batch of held-out prompts (means over its completions / prompts)."""
    from pmetal.rewards import accuracy_reward

    batch = PromptBatch.of(batch)
    rollout = sampler.sample(batch)
    wanted = lambda name: (name in ("reward", "completions/mean_length")  # noqa: E731
                           or (name.startswith("rewards/") and name.endswith("/mean")))
    metrics = {name: value for name, value in rollout.metrics.items() if wanted(name)}
    group = sampler.settings.num_generations
    columns = {name: [v for v in values for _ in range(group)] for name, values in batch.columns.items()}
    if has_answers(columns):
        prompts = [p for p in batch.prompts for _ in range(group)]
        correct = accuracy_reward(prompts, rollout.completions, answer=columns.get("answer"),
                                  solution=columns.get("solution"))
        metrics.update(answer_metrics(correct, group))
    return metrics
