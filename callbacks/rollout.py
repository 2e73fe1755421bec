"""RolloutCallback: the hook that turns each training batch's prompts into a scored rollout.

Before each training batch (``on_train_batch_start``) the callback runs the core sampler
(:class:`pmetal.rl.sampler.RolloutSampler`: generation on the rollout engine, rewards, advantages,
dynamic sampling, async scoring) on the batch's prompts with the module's policy, tokenizer, reward
set and ``rollout_settings()``, and stores the result in ``batch["rollout"]`` (a
``pmetal.rl.rollout.RolloutBatch``) for the module's ``training_step``.

The callback keeps only a cache of the tokenizer's stop ids and the current step's rollout (so a
failed step stops its scoring worker), so it can be added by the module itself
(``configure_callbacks``) and plain ``Trainer().fit(GrpoModule(...), dm)`` works.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from pmetal.generation.sampling import stop_token_ids
from pmetal.rl.rollout import RolloutBatch
from pmetal.rl.sampler import RolloutSampler


class RolloutCallback(L.Callback):
    """Generates and scores the rollout of each training batch (see the module docstring)."""

    def __init__(self) -> None:
        self._stop_ids: tuple[object, list[int]] | None = None  # (tokenizer, its stop ids)
        self._rollout: RolloutBatch | None = None  # the current step's, while its rewards may be scored

    def stop_ids(self, module) -> list[int]:
        # reading the vocabulary costs ~0.1 s on a 50k-word tokenizer: once per tokenizer
        if self._stop_ids is None or self._stop_ids[0] is not module.tokenizer:
            self._stop_ids = (module.tokenizer, stop_token_ids(module.tokenizer, module.policy))
        return self._stop_ids[1]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "prompt_ids" not in batch:
            raise TypeError(
                "RolloutCallback expects prompt batches from pmetal.data.prompts.PromptDataModule "
                f"(a dict with 'prompt_ids'), got {type(batch).__name__}"
            )
        source = getattr(trainer, "datamodule", None)
        # with async rewards the module's reference forward and update overlap the scoring's tail
        self._rollout = make_rollout(pl_module, batch, source=source, stop_ids=self.stop_ids(pl_module),
                                     defer_rewards=True)
        batch["rollout"] = self._rollout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._rollout = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._rollout is not None:  # a step that failed before or inside the update leaves no worker
            self._rollout.stop_scoring()

    def on_fit_start(self, trainer, pl_module) -> None:
        for fn in getattr(getattr(pl_module, "rewards", None), "functions", []):
            if hasattr(fn, "to") and not isinstance(fn, torch.nn.Module):
                fn.to(pl_module.device)  # a reward model runs beside the policy


def sampler_for(module, *, stop_ids: list[int] | None = None, settings=None) -> RolloutSampler:
    """The core sampler over an online method's policy, tokenizer, rewards and rollout settings."""
    return RolloutSampler(module.policy, module.tokenizer, module.rewards, settings or module.rollout_settings(),
                          stop_ids=stop_ids)


def make_rollout(module, batch: dict[str, Any], *, source=None, stop_ids: list[int] | None = None,
                 defer_rewards: bool = False) -> RolloutBatch:
    """The rollout of one prompt batch for `module` (``RolloutSampler.sample``, on the module's device)."""
    return sampler_for(module, stop_ids=stop_ids).sample(batch, source=source, device=module.device,
                                                         defer_rewards=defer_rewards)
