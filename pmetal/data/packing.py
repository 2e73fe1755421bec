"""Padding-free packing: several tokenized rows in one `[1, N]` sequence, attention kept per row.

`pack_rows` groups rows into bins of at most `max_tokens` tokens by best-fit decreasing (each row,
longest first, goes into the fullest bin it still fits in); `packed_collate` concatenates one bin
into the packed-batch format of docs/architecture.md:

    input_ids [1, N], labels [1, N], position_ids [1, N] (restarting at 0 per row), seq_lens [R]

`stack_packed` stacks several packed bins, each padded to the same length, into one `[B, T]` batch
(`seq_lens` then lists every row of every bin in order, padding segments included): under SDPA the
attention mask of a packed sequence is dense `[N, N]`, so B bins of T tokens cost B x T^2 attention
work where one bin of B x T tokens would cost (B x T)^2.

No `attention_mask`: `pmetal.logps.backbone_hidden` passes `position_ids` only, and transformers
confines attention to each row from them (varlen kernels under flash_attention_2, a block-diagonal
causal mask under sdpa/eager). The first label of every row is -100, so no row is trained to
predict its first token from the previous row's last one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from pmetal.errors import DataError
from pmetal.tokens import IGNORE_INDEX



def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of rows grouped into bins of at most `max_tokens` tokens (best-fit decreasing).

    Bins come out in the order they were opened (the longest rows first); rows inside a bin in
    decreasing length. A row longer than `max_tokens` raises a `DataError` naming it: truncate
    rows before packing.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    for index, length in enumerate(lengths):
        if length > max_tokens:
            raise DataError(
                None,
                f"row of {length} tokens does not fit in a packed sequence of {max_tokens} tokens",
                row=index + 1,
                expected=f"rows of at most max_tokens={max_tokens} tokens (truncate them, or raise max_tokens)",
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (free space, bin index) kept sorted: best fit = the smallest free space that still fits.
    free: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, bin_index = free.pop(slot)
            bins[bin_index].append(index)
            bisect.insort(free, (space - length, bin_index))
        else:
            bins.append([index])
            bisect.insort(free, (max_tokens - length, len(bins) - 1))
    return bins


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], max_tokens: int) -> float:
    """Real tokens / (bins x max_tokens): the fraction of the packed sequences that is not empty."""
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * max_tokens)


def packed_collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Concatenate tokenized rows (`input_ids`, optional `labels`) into one packed batch.

    Each row is a dict with `input_ids` (list or 1-D tensor) and optionally `labels` aligned with
    it (-100 = no loss; defaults to the input ids). Extra keys are ignored.
    """
    if not rows:
        raise ValueError("packed_collate needs at least one row")
    ids, labels, positions, lengths = [], [], [], []
    for row in rows:
        row_ids = torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(-1)
        row_labels = torch.as_tensor(row.get("labels", row_ids), dtype=torch.long).reshape(-1).clone()
        if row_labels.shape != row_ids.shape:
            raise ValueError(f"labels ({row_labels.numel()}) and input_ids ({row_ids.numel()}) differ in length")
        if row_ids.numel() == 0:
            continue
        row_labels[0] = IGNORE_INDEX  # labels[start] would be predicted from the previous row's last token
        ids.append(row_ids)
        labels.append(row_labels)
        positions.append(torch.arange(row_ids.numel()))
        lengths.append(row_ids.numel())
    if not ids:
        raise ValueError("packed_collate got only empty rows")
    return {
        "input_ids": torch.cat(ids).unsqueeze(0),  # [1, N]
        "labels": torch.cat(labels).unsqueeze(0),  # [1, N]
        "position_ids": torch.cat(positions).unsqueeze(0),  # [1, N]
        "seq_lens": torch.tensor(lengths, dtype=torch.long),  # [R]
    }


def stack_packed(packed: Sequence[dict[str, torch.Tensor]], length: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack packed batches (from `packed_collate`, each at most `length` tokens) into [B, length].

    Each bin is padded at its end by a segment of its own (`pad_id`, labels -100, positions from 0),
    which is listed in `seq_lens` like a row, so attention and row sums never mix it with real rows.
    """
    ids, labels, positions, seq_lens = [], [], [], []
    for index, one in enumerate(packed):
        n = one["input_ids"].shape[1]
        if n > length:
            raise ValueError(f"packed bin {index} has {n} tokens, more than length={length}")
        pad = length - n
        ids.append(torch.cat([one["input_ids"][0], torch.full((pad,), pad_id, dtype=torch.long)]))
        labels.append(torch.cat([one["labels"][0], torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]))
        positions.append(torch.cat([one["position_ids"][0], torch.arange(pad)]))
        seq_lens.append(one["seq_lens"])
        if pad:
            seq_lens.append(torch.tensor([pad]))
    return {
        "input_ids": torch.stack(ids),  # [B, length]
        "labels": torch.stack(labels),  # [B, length]
        "position_ids": torch.stack(positions),  # [B, length]
        "seq_lens": torch.cat(seq_lens),  # [R + padded bins]
    }
