"""Distillation data: SFT rows, and the on-policy batches made from their prompts.

`DistillDataModule` is `SftDataModule` (every SFT layout, assistant-only labels) without packing by
default: an on-policy step samples one completion per row, so a batch is `batch_size` rows.
`batch_prompts` takes each row's prompt back out of a causal-LM batch (padded or packed): the
tokens before its last labelled span, i.e. the conversation up to the generation prompt of its
last assistant turn (as TRL's GKD collator: every message but the last, with the generation
prompt). `sampled_batch` turns prompts and the student's sampled completions into the causal-LM
batch the loss reads, labels on the completion tokens only (the stop token included).
"""

from __future__ import annotations

from typing import Any

import torch

from pmetal.data.datamodule import SftDataModule
from pmetal.tokens import IGNORE_INDEX


class DistillDataModule(SftDataModule):
    """SFT data for distillation: the dataset's completions (off-policy) and its prompts (on-policy).

    Args:
        path: training data in any SFT layout (prompt/completion, messages, ...); None uses
            pmetal's small shipped example (examples/data/sft.jsonl).
        packing: pack several rows into one sequence; off by default, since an on-policy batch
            samples one completion per row of the batch.
        **kwargs: SftDataModule's settings (batch_size, max_seq_len, val_fraction, ...).
    """

    def __init__(self, path: str | None = None, packing: bool = False, **kwargs: Any) -> None:
        super().__init__(path, packing=packing, **kwargs)


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids [t], labels [t]) of each row of a padded batch (attention mask) or packed one (seq_lens)."""
    ids, labels = batch["input_ids"], batch["labels"]
    if batch.get("seq_lens") is not None:
        lengths = batch["seq_lens"].tolist()
        return list(zip(ids.reshape(-1).split(lengths), labels.reshape(-1).split(lengths)))
    mask = batch["attention_mask"].bool()
    return [(ids[b][mask[b]], labels[b][mask[b]]) for b in range(ids.shape[0])]


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt: its tokens before the first label of its last labelled span (rows without
    a label, such as a packed bin's padding, give none)."""
    prompts = []
    for ids, labels in _rows(batch):
        labelled = (labels != IGNORE_INDEX).nonzero().flatten()
        if labelled.numel() == 0:
            continue
        gaps = (labelled[1:] - labelled[:-1] > 1).nonzero().flatten()
        start = int(labelled[int(gaps[-1]) + 1]) if gaps.numel() else int(labelled[0])
        if start > 0:
            prompts.append(ids[:start].tolist())
    return prompts


def sampled_batch(prompts: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                  pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded causal-LM batch of `prompts[i] + completion i` with labels on the completion.

    `completion_ids` / `completion_mask` are ``[N, L]`` (a `pmetal.generation.Generation`'s, one
    completion per prompt); the mask marks the generated tokens up to and including the stop token.
    """
    lengths = completion_mask.sum(1).tolist()
    rows = [p + completion_ids[i, : int(n)].tolist() for i, (p, n) in enumerate(zip(prompts, lengths))]
    width = max(len(r) for r in rows)
    device = completion_ids.device
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        input_ids[i, : len(row)] = torch.tensor(row, device=device)
        attention[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = input_ids[i, len(prompt) : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
