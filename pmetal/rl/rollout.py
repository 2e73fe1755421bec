"""The typed rollout: sampled completions laid out for the policy update.

A :class:`RolloutBatch` is tensors plus per-row metadata (in the spirit of torchtune's
``GRPOTrajectory``): the padded rows, their sampling-time log-probs, rewards and advantages, and
for each row its group (prompt) and whether it was cut at the token budget.

Each completion becomes one right-padded causal-LM row, ``prompt tokens + completion tokens``
(the prompt without its generation-time left padding, so positions are plain ``0..T-1`` and the
row is exactly the standard causal-LM batch of ``pmetal.logps``). ``labels`` hold the completion
tokens (``-100`` elsewhere) and every per-token tensor (``old_logps``, later ``ref_logps``) is
aligned with ``labels``, as ``completion_logps(..., return_token_logps=True).token_logps`` is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pmetal.generation.sampling import Generation
from pmetal.tokens import IGNORE_INDEX


class PendingRewards(Protocol):
    """Rewards still being scored (``pmetal.rl.scoring.RewardScoring``), as the rollout sees them."""

    def wait(self, rows: int | None = None) -> float: ...

    def close(self) -> None: ...


@dataclass
class RolloutRow:
    """One completion, before padding."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logps: list[float]
    reward: float
    group: int  # which prompt (rows of a group share it)
    truncated: bool
    pixel_inputs: dict | None = None  # a VLM prompt's image tensors (shared by its group)
    model_mask: list[bool] | None = None  # tool episodes: False on tool-result tokens (never trained)


def rows_from_generation(gen: Generation, rewards: Sequence[float], group_size: int,
                         first_group: int = 0) -> list[RolloutRow]:
    """Split a :class:`Generation` into rows (prompt padding and completion padding removed)."""
    rows = []
    lengths = gen.lengths.tolist()
    for r in range(gen.completion_ids.shape[0]):
        prompt = gen.prompt_ids[r][gen.prompt_mask[r].bool()].tolist()
        n = int(lengths[r])
        rows.append(RolloutRow(prompt, gen.completion_ids[r, :n].tolist(), gen.logps[r, :n].tolist(),
                               float(rewards[r]), first_group + r // group_size, not bool(gen.stopped[r])))
        if getattr(gen, "model_mask", None) is not None:  # pmetal.tools.agent.EpisodeGeneration
            rows[-1].model_mask = gen.model_mask[r, :n].tolist()
    return rows


@dataclass
class RolloutBatch:
    """Completions of ``num_prompts`` prompts x ``group_size``, ready for the update (``N`` rows)."""

    input_ids: torch.Tensor  # [N, T] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T] completion tokens, -100 elsewhere
    old_logps: torch.Tensor  # [N, T] float32 sampling-time log-probs, aligned with labels (0 elsewhere)
    advantages: torch.Tensor  # [N] float32
    rewards: torch.Tensor  # [N] float32
    group_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)
    ref_logps: torch.Tensor | None = None  # [N, T] filled in by the module when beta > 0
    pixel_inputs: list[dict | None] | None = None  # a VLM: each row's image tensors (its prompt's)
    group_ids: torch.Tensor | None = None  # [N] long: the prompt (group) of each row, counted over the step
    truncated: torch.Tensor | None = None  # [N] bool: the completion hit the token budget (no stop token)
    # Rewards still being scored: with async rewards the update starts before the last chunk is
    # scored; ``wait_for_rewards`` fills rewards and advantages.
    scoring: PendingRewards | None = None
    started_at: float | None = None  # time.perf_counter() when sampling began (the step's timing)

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def completion_mask(self) -> torch.Tensor:  # [N, T]
        return self.labels != IGNORE_INDEX

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def wait_for_rewards(self, rows: int | None = None) -> float:
        """Block until the first ``rows`` rows (None: all) have rewards and advantages; the seconds waited."""
        return self.scoring.wait(rows) if self.scoring is not None else 0.0

    def stop_scoring(self) -> None:
        """Cancel the scoring still queued and wait for the running one (a failed step leaves no worker)."""
        if self.scoring is not None:
            self.scoring.close()

    def micro_batches(self, size: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive slices of at most ``size`` rows, each trimmed of all-padding columns."""
        out = []
        for start in range(0, self.num_sequences, max(1, size)):
            rows = slice(start, start + size)
            width = int(self.attention_mask[rows].sum(dim=1).max())
            part = {
                "input_ids": self.input_ids[rows, :width],
                "attention_mask": self.attention_mask[rows, :width],
                "labels": self.labels[rows, :width],
                "old_logps": self.old_logps[rows, :width],
                "advantages": self.advantages[rows],
            }
            if self.ref_logps is not None:
                part["ref_logps"] = self.ref_logps[rows, :width]
            if self.pixel_inputs is not None:
                from pmetal.vlm import collate_pixel_inputs

                part["pixel_inputs"] = collate_pixel_inputs(self.pixel_inputs[rows])
            out.append(part)
        return out

    def to(self, device) -> RolloutBatch:
        for name in ("input_ids", "attention_mask", "labels", "old_logps", "advantages", "rewards", "group_ids",
                     "truncated"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self


def assemble(rows: Sequence[RolloutRow], advantages: torch.Tensor, *, pad_token_id: int, group_size: int,
             device=None) -> RolloutBatch:
    """Pad rows into a :class:`RolloutBatch` (``advantages [N]`` in row order)."""
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rows) if rows else 1
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    old_logps = torch.zeros((n, width), dtype=torch.float32)
    for i, row in enumerate(rows):
        p, c = len(row.prompt_ids), len(row.completion_ids)
        input_ids[i, : p + c] = torch.tensor(row.prompt_ids + row.completion_ids, dtype=torch.long)
        attention_mask[i, : p + c] = 1
        labels[i, p : p + c] = torch.tensor(row.completion_ids, dtype=torch.long)
        if row.model_mask is not None:  # tool tokens: outside the loss and the importance ratio
            labels[i, p : p + c].masked_fill_(~torch.tensor(row.model_mask, dtype=torch.bool), IGNORE_INDEX)
        old_logps[i, p : p + c] = torch.tensor(row.old_logps, dtype=torch.float32)
    batch = RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        old_logps=old_logps,
        advantages=advantages.detach().float().cpu(),
        rewards=torch.tensor([r.reward for r in rows], dtype=torch.float32),
        group_size=group_size,
        group_ids=torch.tensor([r.group for r in rows], dtype=torch.long),
        truncated=torch.tensor([r.truncated for r in rows], dtype=torch.bool),
        pixel_inputs=[r.pixel_inputs for r in rows] if any(r.pixel_inputs for r in rows) else None,
    )
    return batch.to(device) if device is not None else batch
