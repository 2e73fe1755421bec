"""Log-probs and the LM loss of a causal LM without full-vocabulary logits.

Every method gets its log-probs here: SFT calls `lm_loss`, DPO/KTO/GRPO... call `completion_logps`.
The model runs as backbone (decoder stack, adapters included) + LM head; the head and the
log-softmax run chunk by chunk inside the custom autograd functions of `pmetal.losses.lm`, so the
`[tokens, vocab]` logits are never kept alive (for Qwen3's 151,936-word vocabulary they are most of
a training step's memory). Only the positions that have a label go through the head at all.

Labels are aligned with `input_ids` (`-100` = no loss); the shift happens here: the log-prob at
position t is log p(labels[t] | tokens < t), computed from the hidden state at t - 1. Position 0 of
every row (and of every packed segment) has nothing before it and is never scored.

A packed batch (`input_ids [1, N]`, `position_ids` restarting at 0 per row, `seq_lens [R]`, see
`pmetal.data.packing`; or several packed bins stacked as `[B, T]`, rows listed in order in `seq_lens`,
none crossing a bin) is run with attention confined to each row: with `flash_attention_2` through
varlen kernels (from `position_ids`), with `sdpa`/`eager` through the block-diagonal causal mask that
transformers derives from `position_ids` when no `attention_mask` is given
(`masking_utils.find_packed_sequence_indices`; tests/unit/test_packing.py checks it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pmetal.errors import PmetalError
from pmetal.losses.lm import chunked_linear_cross_entropy, chunked_linear_logps
from pmetal.tokens import IGNORE_INDEX


class CompletionLogps(NamedTuple):
    """Log-probs of the labelled tokens of each row (fp32)."""

    sum: torch.Tensor  # [B] (packed: [R]) sum of log p over label tokens
    mean: torch.Tensor  # [B] sum / num_tokens (0 for a row without label tokens)
    num_tokens: torch.Tensor  # [B] long, label tokens that were scored
    token_logps: torch.Tensor | None  # [B, T] aligned with labels, 0 where not scored
    # [B, T] the mean over the vocabulary of each scored position's logits (TRL's `logits/*`), no gradient
    token_mean_logits: torch.Tensor | None = None
    # [B, T] the entropy of each scored position's next-token distribution (at the temperature), no gradient
    token_entropy: torch.Tensor | None = None


def backbone_and_head(model) -> tuple[nn.Module, nn.Module]:
    """Split a causal LM (plain Hugging Face or PEFT-wrapped) into its decoder stack and LM head.

    Adapters injected by PEFT live inside the backbone's layers, so they stay active when the
    backbone is called directly, and `with peft_model.disable_adapter():` still switches them off.
    """
    from pmetal.vlm import multimodal_model

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = multimodal_model(base)  # a VLM: vision tower + projector + language model
    if backbone is None and hasattr(base, "get_decoder"):
        backbone = base.get_decoder()
    if backbone is None or backbone is base:
        backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if head is None or backbone is None or backbone is base:
        raise PmetalError(
            f"{type(base).__name__} is not a causal language model pmetal can split into a decoder and an LM head "
            "(expected get_decoder() and get_output_embeddings(), as in *ForCausalLM models)"
        )
    return backbone, head


def _config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def packed_position_ids(seq_lens: torch.Tensor) -> torch.Tensor:
    """[1, N] positions restarting at 0 for each row of lengths `seq_lens [R]`."""
    seq_lens = seq_lens.long()
    starts = torch.cumsum(seq_lens, 0) - seq_lens  # [R]
    total = int(seq_lens.sum())
    index = torch.arange(total, device=seq_lens.device)
    return (index - torch.repeat_interleave(starts, seq_lens)).unsqueeze(0)


def backbone_hidden(model, input_ids, attention_mask=None, position_ids=None, seq_lens=None,
                    pixel_inputs=None) -> torch.Tensor:
    """Final hidden states [B, T, H] of the decoder stack (final norm included, LM head not).

    For a packed batch pass `seq_lens` (and/or `position_ids`); `attention_mask` is then ignored,
    since transformers confines attention to each row only when it gets no 2-D mask. A VLM batch
    passes its image tensors as `pixel_inputs` (see `pmetal.vlm`).
    """
    from pmetal.vlm import forward_inputs

    backbone, _ = backbone_and_head(model)
    if seq_lens is not None:
        if position_ids is None:
            position_ids = packed_position_ids(seq_lens.to(input_ids.device)).view(input_ids.shape)
        attention_mask = None
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        return_dict=True,
        **forward_inputs(model, input_ids, pixel_inputs),
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _scored_labels(labels: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """Labels [B, T] with every position that has no preceding token in its row set to -100."""
    labels = labels.clone(memory_format=torch.contiguous_format)
    labels[:, 0] = IGNORE_INDEX
    if seq_lens is not None:
        starts = (torch.cumsum(seq_lens.long(), 0) - seq_lens.long()).to(labels.device)
        labels.view(-1)[starts] = IGNORE_INDEX  # a row's first token must not be predicted from the previous row
    return labels


def _head_logps(hidden, head, targets, *, temperature, softcap, chunk_size=None) -> torch.Tensor:
    """log p(targets) [M] from hidden [M, H] through the LM head, chunked."""
    if _is_plain_linear(head):
        return chunked_linear_logps(
            hidden, head.weight, targets, head.bias, temperature=temperature, softcap=softcap, chunk_size=chunk_size
        )
    return _module_chunked_logps(hidden, head, targets, temperature=temperature, softcap=softcap)


def _is_plain_linear(head) -> bool:
    # A LoRA-wrapped or quantized head (bnb's Linear4bit subclasses nn.Linear) has its own forward.
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


def _module_chunked_logps(hidden, head, targets, *, temperature, softcap, chunk_tokens: int = 1024):
    """Fallback for heads that are not a plain nn.Linear: run the module per chunk under
    non-reentrant checkpointing, so one chunk's logits are alive at a time (recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    def chunk_logps(h, t):
        logits = head(h).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logps = torch.log_softmax(logits / temperature, dim=-1).gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
        return torch.where(t != IGNORE_INDEX, logps, 0.0)

    parts = [
        checkpoint(chunk_logps, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens], use_reentrant=False)
        for i in range(0, hidden.shape[0], chunk_tokens)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def _token_entropies(hidden, head, *, temperature, softcap, chunk_tokens: int = 1024) -> torch.Tensor:
    """The entropy of the next-token distribution of each row of hidden [M, H] -> [M] fp32, chunk by
    chunk so one chunk's logits are alive at a time (GRPO's entropy masking)."""
    parts = []
    for i in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[i : i + chunk_tokens].detach()).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logps = torch.log_softmax(logits / temperature, dim=-1)
        parts.append(-(logps.exp() * logps).sum(-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def _vocab_mean_logits(hidden, head, *, softcap, chunk_tokens: int = 1024) -> torch.Tensor:
    """The mean over the vocabulary of the logits of each row of hidden [M, H] -> [M] fp32.

    For a plain linear head without softcapping the mean is linear, mean(h W^T + b) = h . mean(W) + mean(b),
    so no logits are made; otherwise the head runs chunk by chunk.
    """
    hidden = hidden.detach()
    if _is_plain_linear(head) and softcap is None:
        # autocast would run this matmul in bf16/fp16 (even on fp32 inputs): a [M, H] x [H] product, so fp32 costs nothing
        with torch.autocast(hidden.device.type, enabled=False):
            mean = hidden.float() @ head.weight.float().mean(0)
        return mean + head.bias.float().mean() if head.bias is not None else mean
    parts = []
    for i in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[i : i + chunk_tokens]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        parts.append(logits.mean(-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def selected_hidden(model, input_ids, attention_mask, labels, position_ids=None, seq_lens=None, pixel_inputs=None):
    """Hidden states of the positions that predict a label: (hidden [M, H], targets [M], mask [B, T]).

    The label shift of every method: `hidden[i]` is the state at t - 1 of the i-th scored label
    position t (`mask[b, t]`, in row-major order) and `targets[i]` is its label. A method that needs
    more than log-probs (RLKD's teacher and student logits) starts here.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    if seq_lens is not None and int(seq_lens.sum()) != input_ids.numel():
        raise ValueError(
            f"packed batch: seq_lens sum to {int(seq_lens.sum())} but input_ids {tuple(input_ids.shape)} "
            f"hold {input_ids.numel()} tokens"
        )
    hidden = backbone_hidden(model, input_ids, attention_mask, position_ids, seq_lens, pixel_inputs)  # [B, T, H]
    scored = _scored_labels(labels, seq_lens)  # [B, T]
    if attention_mask is not None and seq_lens is None:
        scored = scored.masked_fill(attention_mask == 0, IGNORE_INDEX)
    mask = scored != IGNORE_INDEX  # [B, T]: label positions that are scored
    # Position t is predicted by hidden[t - 1].
    return hidden[:, :-1][mask[:, 1:]], scored[mask], mask


def completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_token_logps: bool = False,
    return_mean_logits: bool = False,
    return_token_entropy: bool = False,
    pixel_inputs: dict | None = None,
) -> CompletionLogps:
    """Sum / mean / per-token log-probs of the label tokens of each row.

    Args:
        model: a Hugging Face causal LM, PEFT-wrapped or not.
        input_ids: [B, T] token ids (a packed batch: [1, N]).
        attention_mask: [B, T] 1 for real tokens (None for a packed batch).
        labels: [B, T] aligned with input_ids; -100 = not scored.
        position_ids: [B, T] optional positions (packed: restarting at 0 per row).
        seq_lens: [R] row lengths of a packed batch; the results are then per row ([R]).
        temperature: logits are divided by it before the softmax (GRPO's sampling temperature).
        return_token_logps: also return token_logps [B, T].
        return_mean_logits: also return token_mean_logits [B, T] (the mean logit over the vocabulary
            at each scored position, before the temperature; a logged statistic, without gradient).
        return_token_entropy: also return token_entropy [B, T] (the entropy of each scored position's
            distribution at the temperature; without gradient).
        pixel_inputs: a VLM batch's image tensors (`pixel_values`, ...; see `pmetal.vlm`).
    """
    hidden, targets, mask = selected_hidden(model, input_ids, attention_mask, labels, position_ids, seq_lens,
                                            pixel_inputs)
    return scored_logps(model, hidden, targets, mask, seq_lens=seq_lens, temperature=temperature,
                        return_token_logps=return_token_logps, return_mean_logits=return_mean_logits,
                        return_token_entropy=return_token_entropy)


def scored_logps(model, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                 seq_lens: torch.Tensor | None = None, temperature: float = 1.0, return_token_logps: bool = False,
                 return_mean_logits: bool = False, return_token_entropy: bool = False) -> CompletionLogps:
    """`completion_logps` from the hidden states that predict each scored label (`selected_hidden`'s
    `hidden [M, H]`, `targets [M]`, `mask [B, T]`, or a caller's own selection of them)."""
    softcap = getattr(_config(model), "final_logit_softcapping", None)
    _, head = backbone_and_head(model)
    logps = _head_logps(hidden, head, targets, temperature=temperature, softcap=softcap)  # [M] fp32
    token_logps = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps)
    if seq_lens is None:
        sums = token_logps.sum(-1)  # [B]
        counts = mask.sum(-1)  # [B]
    else:
        seq_lens = seq_lens.to(mask.device).long()
        row = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=mask.device), seq_lens)  # [N]
        sums = token_logps.new_zeros(seq_lens.numel()).index_add(0, row, token_logps.view(-1))  # [R]
        counts = torch.zeros_like(seq_lens).index_add(0, row, mask.view(-1).long())  # [R]
    means = sums / counts.clamp_min(1)
    mean_logits = None
    if return_mean_logits:
        mean_logits = torch.zeros(mask.shape, dtype=torch.float32, device=logps.device)
        mean_logits = mean_logits.masked_scatter(mask, _vocab_mean_logits(hidden, head, softcap=softcap).float())
    entropy = None
    if return_token_entropy:
        entropy = torch.zeros(mask.shape, dtype=torch.float32, device=logps.device).masked_scatter(
            mask, _token_entropies(hidden, head, temperature=temperature, softcap=softcap).float())
    return CompletionLogps(sums, means, counts, token_logps if return_token_logps else None, mean_logits, entropy)


def lm_loss(model, batch: dict, *, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the label tokens of a causal-LM or packed batch.

    Returns (loss 0-d fp32, num_tokens 0-d long). A batch without any label token gives loss 0.
    """
    config = _config(model)
    softcap = getattr(config, "final_logit_softcapping", None)
    _, head = backbone_and_head(model)
    hidden, targets, _ = selected_hidden(
        model,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch["labels"],
        batch.get("position_ids"),
        batch.get("seq_lens"),
        batch.get("pixel_inputs"),
    )
    num_tokens = torch.tensor(targets.numel(), device=targets.device)
    if _is_plain_linear(head):
        loss = chunked_linear_cross_entropy(
            hidden, head.weight, targets, head.bias, softcap=softcap, chunk_size=chunk_size
        )
    else:
        loss = -_module_chunked_logps(hidden, head, targets, temperature=1.0, softcap=softcap).sum()
        loss = loss / num_tokens.clamp_min(1)
    return loss, num_tokens
