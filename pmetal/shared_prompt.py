"""Chosen and rejected completions in one row that holds their common prompt once.

A preference pair's two sequences start with the same tokens (the prompt, and any words both
completions begin with). The plain path runs them as two padded rows, so the prompt goes through
the model twice. Here each pair becomes ONE row,

    [shared prefix | rest of chosen | rest of rejected | padding]

with position ids restarting at the prefix length for the rejected part, and a 4-D attention mask
in which every token sees the shared prefix and the earlier tokens of its own branch, never the
other branch. Each token's hidden state is then the one it has in its own plain row (same tokens
before it, same positions), so the log-probs equal the plain path's up to float rounding, and the
gradient through the shared prefix is the sum of what the two copies receive there. A 256-token
prompt with two 256-token completions is 768 tokens instead of 1,024; a long prompt saves almost half.

Only attention implementations that take a custom 4-D mask can run it: "sdpa" (boolean mask) and
"eager" (additive mask). flash/flex attention, VLMs (their multimodal rotary positions) and
sliding-window layers keep the plain path (`shared_prompt_supported`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pmetal.tokens import IGNORE_INDEX

SHARED_PROMPT_ATTENTION = ("sdpa", "eager")
_PAD, _SHARED, _CHOSEN, _REJECTED = -1, 0, 1, 2


class SharedLayout(NamedTuple):
    """One row per pair: tokens, positions, the 4-D mask's inputs, and where each side's tokens went."""

    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long
    segment: torch.Tensor  # [B, T] -1 padding, 0 shared, 1 chosen, 2 rejected
    chosen_index: torch.Tensor  # [B, Tc] column of chosen position t in the row (-1: padding)
    rejected_index: torch.Tensor  # [B, Tr] column of rejected position t in the row (-1: padding)
    shared_tokens: int  # tokens not computed twice (for logging and the benchmark)


def _common_prefix(a: torch.Tensor, b: torch.Tensor, len_a: torch.Tensor, len_b: torch.Tensor) -> torch.Tensor:
    """[B] length of the longest common prefix of the real tokens of rows a and b."""
    width = min(a.shape[1], b.shape[1])
    same = a[:, :width] == b[:, :width]
    same &= torch.arange(width, device=a.device) < torch.minimum(len_a, len_b).unsqueeze(1)
    differ = ~same
    return torch.where(differ.any(1), differ.int().argmax(1), width).long()  # the first difference


def shared_layout(chosen_ids: torch.Tensor, chosen_mask: torch.Tensor, rejected_ids: torch.Tensor,
                  rejected_mask: torch.Tensor, pad_id: int = 0) -> SharedLayout:
    """The one-row-per-pair layout of right-padded chosen `[B, Tc]` and rejected `[B, Tr]` rows."""
    device = chosen_ids.device
    len_c, len_r = chosen_mask.long().sum(1), rejected_mask.long().sum(1)  # [B]
    shared = _common_prefix(chosen_ids, rejected_ids, len_c, len_r)  # [B]
    width = int((len_c + len_r - shared).max())
    t_c = torch.arange(chosen_ids.shape[1], device=device).expand_as(chosen_ids)
    t_r = torch.arange(rejected_ids.shape[1], device=device).expand_as(rejected_ids)
    # Chosen occupies columns [0, len_c) as in its own row; rejected's rest follows it.
    chosen_index = torch.where(t_c < len_c[:, None], t_c, -1)
    rejected_col = torch.where(t_r < shared[:, None], t_r, len_c[:, None] + t_r - shared[:, None])
    rejected_index = torch.where(t_r < len_r[:, None], rejected_col, -1)

    batch = chosen_ids.shape[0]
    input_ids = torch.full((batch, width + 1), pad_id, dtype=torch.long, device=device)  # column `width`: a sink
    position_ids = torch.zeros((batch, width + 1), dtype=torch.long, device=device)
    segment = torch.full((batch, width + 1), _PAD, dtype=torch.long, device=device)
    sink = lambda index: torch.where(index < 0, width, index)  # noqa: E731  (padding positions land in the sink)
    rows_c, rows_r = sink(chosen_index), sink(rejected_index)
    input_ids.scatter_(1, rows_r, rejected_ids)
    input_ids.scatter_(1, rows_c, chosen_ids)
    position_ids.scatter_(1, rows_r, t_r)
    position_ids.scatter_(1, rows_c, t_c)
    segment.scatter_(1, rows_r, torch.where(t_r < shared[:, None], _SHARED, _REJECTED))
    segment.scatter_(1, rows_c, torch.where(t_c < shared[:, None], _SHARED, _CHOSEN))
    keep = slice(None, width)
    segment, input_ids, position_ids = segment[:, keep], input_ids[:, keep], position_ids[:, keep]
    real = segment != _PAD
    input_ids, position_ids = input_ids.masked_fill(~real, pad_id), position_ids.masked_fill(~real, 0)
    return SharedLayout(input_ids, position_ids, segment, chosen_index, rejected_index, int(shared.sum()))


def shared_attention_mask(segment: torch.Tensor, attn_implementation: str,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `[B, 1, T, T]` mask of a layout: causal, a branch never sees the other; padding sees itself.

    "sdpa" takes it boolean (True = attend), "eager" additive (0 or the dtype's minimum). Padding
    rows attend to themselves only, so no softmax row is empty (an empty one gives NaN, and NaN times
    the zero gradient of an unscored position is still NaN).
    """
    width = segment.shape[1]
    col = torch.arange(width, device=segment.device)
    causal = col[None, :] <= col[:, None]  # [T, T] key <= query
    query, key = segment[:, :, None], segment[:, None, :]  # [B, T, 1], [B, 1, T]
    allowed = causal & (key != _PAD) & ((key == _SHARED) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)
    allowed = allowed[:, None]  # [B, 1, T, T]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment.device).masked_fill(~allowed, torch.finfo(dtype).min)


def predictor_columns(index: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one side's `[B, T]` labels and column map: (scored mask [B, T], predicting column [B, T]).

    Position t of the side is predicted by the hidden state of its position t - 1, wherever that
    token sits in the shared row; position 0 and padding are never scored.
    """
    scored = (labels != IGNORE_INDEX) & (index >= 0)
    scored[:, 0] = False
    previous = torch.cat([index.new_zeros(index.shape[0], 1), index[:, :-1]], dim=1)
    return scored, previous.clamp_min(0)


def shared_prompt_supported(config, attn_implementation: str | None, is_vlm: bool) -> bool:
    """Whether a model can run the shared-prompt layout exactly (a custom 4-D mask, one rotary axis,
    no sliding-window layers)."""
    if is_vlm or attn_implementation not in SHARED_PROMPT_ATTENTION:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)


def _pad_index(index: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(index, (0, width - index.shape[1]), value=-1) if index.shape[1] < width else index


def shared_prompt_logps(model, batch: dict[str, torch.Tensor], labels: torch.Tensor, *, attn_implementation: str,
                        pad_id: int = 0, return_token_logps: bool = False, return_mean_logits: bool = False):
    """`pmetal.logps.completion_logps` of the `[2B, T]` rows "chosen then rejected" of a preference
    batch (`chosen_*`/`rejected_*`, right-padded), computed on the shared-prompt layout.

    `labels [2B, T]` says which tokens of each side are scored (the completions; ORPO's full NLL
    also the chosen prompt); the results are per side row, as if each row had run alone.
    """
    from pmetal.logps import backbone_hidden, scored_logps

    layout = shared_layout(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["rejected_input_ids"],
                           batch["rejected_attention_mask"], pad_id)
    mask = shared_attention_mask(layout.segment, attn_implementation)
    hidden = backbone_hidden(model, layout.input_ids, mask, layout.position_ids)  # [B, W, H]
    width = labels.shape[1]
    index = torch.cat([_pad_index(layout.chosen_index, width), _pad_index(layout.rejected_index, width)])  # [2B, T]
    scored, column = predictor_columns(index, labels)
    pair = torch.arange(index.shape[0], device=index.device) % layout.input_ids.shape[0]  # [2B] the row of each side
    selected = hidden[pair[:, None].expand_as(column)[scored], column[scored]]  # [M, H]
    return scored_logps(model, selected, labels[scored], scored, return_token_logps=return_token_logps,
                        return_mean_logits=return_mean_logits)
