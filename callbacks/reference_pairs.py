"""ReferencePairRollout: XPO's rollout, one completion of the policy and one of the reference per prompt.

`RolloutCallback`'s pipeline (`make_rollout`) runs twice on the batch's prompts, one completion
each: once with the module's policy, once with what its `reference_sampler()` yields (the base
with the adapter switched off, or the frozen copy under full fine-tuning). The two rollouts are
interleaved into one with groups of two, row ``2p`` the policy's completion of prompt ``p`` and
row ``2p + 1`` the reference's, which `XpoModule` ranks into pairs. Every reward is scored before
the module sees the rollout.
"""

from __future__ import annotations

import dataclasses

import torch

from pmetal.callbacks.rollout import RolloutCallback, make_rollout
from pmetal.rl.rollout import RolloutBatch
from pmetal.tokens import IGNORE_INDEX


class ReferencePairRollout(RolloutCallback):
    """Samples (policy, reference) completion pairs for each training batch (see the module docstring)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "prompt_ids" not in batch:
            return super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # its message
        stop_ids = self.stop_ids(pl_module)
        policy_side = make_rollout(pl_module, batch, stop_ids=stop_ids)
        with pl_module.reference_sampler() as sampler:
            reference_side = make_rollout(sampler, batch, stop_ids=stop_ids)
        self._rollout = interleave_rollouts(policy_side, reference_side)
        batch["rollout"] = self._rollout


def _pad_columns(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value) if x.shape[1] < width else x


def interleave_rollouts(first: RolloutBatch, second: RolloutBatch) -> RolloutBatch:
    """One rollout with groups of two: row `2p` is `first`'s row `p`, row `2p + 1` is `second`'s."""
    if first.num_sequences != second.num_sequences:
        raise ValueError(f"rollouts of {first.num_sequences} and {second.num_sequences} rows cannot be paired")
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def weave(name: str, pad) -> torch.Tensor:
        a, b = getattr(first, name), getattr(second, name)
        if a.dim() == 2:
            a, b = _pad_columns(a, width, pad), _pad_columns(b, width, pad)
        return torch.stack([a, b], dim=1).flatten(0, 1)

    pixels = None
    if first.pixel_inputs is not None or second.pixel_inputs is not None:
        a = first.pixel_inputs or [None] * first.num_sequences
        b = second.pixel_inputs or [None] * second.num_sequences
        pixels = [p for pair in zip(a, b) for p in pair]
    completions = [c for pair in zip(first.completions, second.completions) for c in pair]
    metrics = dict(first.metrics)  # the policy's samples: the reward and lengths the run is judged by
    metrics.update({f"reference/{k}": v for k, v in second.metrics.items()
                    if k == "reward" or k.startswith("completions/")})
    return dataclasses.replace(
        first, input_ids=weave("input_ids", 0), attention_mask=weave("attention_mask", 0),
        labels=weave("labels", IGNORE_INDEX), old_logps=weave("old_logps", 0.0), advantages=weave("advantages", 0.0),
        rewards=weave("rewards", 0.0), group_size=2, completions=completions, metrics=metrics, pixel_inputs=pixels,
        ref_logps=None, scoring=None,
    )
