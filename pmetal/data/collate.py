"""Pad tokenized rows into the causal-LM batch of docs/architecture.md.

`input_ids [B,T]`, `attention_mask [B,T]`, `labels [B,T]` (long), right-padded to the longest row
of the batch (optionally rounded up to a multiple of 8, which tensor cores and MPS kernels like).
Padding positions get `attention_mask = 0` and `labels = -100`, so the pad id never reaches the
loss - it may even equal EOS without hiding a learned EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pmetal.tokens import IGNORE_INDEX



@dataclass
class PaddingCollator:
    """Collate rows `{"input_ids": list[int], "labels": list[int]}` into a padded batch.

    Args:
        pad_token_id: the id written at padding positions (masked out of attention and loss).
        pad_to_multiple_of: round the padded length up to a multiple of this (1 = no rounding).
        max_length: never pad beyond this length (a rounded length is capped by it).
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int = 1
    max_length: int | None = None

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PaddingCollator needs at least one row")
        longest = max(len(r["input_ids"]) for r in rows)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:
            length = max(longest, min(length, self.max_length))
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(row.get("labels", row["input_ids"]), dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
