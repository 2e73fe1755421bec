"""The engine's KV cache and attention: fixed buffers written at slot indices, read through one 4-D mask.

:class:`SlotCache` holds ``[rows, kv_heads, capacity, head_dim]`` per layer and writes each forward's
keys and values at the slots the round chose; :func:`slot_attention` is SDPA over it with the
grouped-query heads folded into the query length (transformers repeats K and V per query head
whenever a mask is given), swapped in for a model's SDPA layers by :class:`use_slot_attention`.
With ``kernel=True`` decode and verify rounds go through the Triton kernel of
:mod:`pmetal.generation.decode_attention` instead (one kernel per layer, reading only the columns
the mask allows).
"""

from __future__ import annotations

import torch

from pmetal.generation.hf_internals import dispatch_attention, register_attention


class SlotCache:
    """A KV cache of fixed ``[rows, heads, capacity, dim]`` buffers, written at ``write_index`` slots.

    Duck-types the part of ``transformers.Cache`` a decoder layer uses (``update``); the mask is
    always passed in 4-D, so the model never asks the cache for mask sizes.
    """

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.is_sliding = [False] * len(keys)  # transformers 5.1x reads it per layer before taking a 4-D mask
        self.write_index: torch.Tensor | None = None  # [T] long, set before every forward
        self.limit: int | None = None  # eager rounds attend to the written columns only
        self.seen = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        try:
            k.index_copy_(2, self.write_index, key_states.to(k.dtype))
            v.index_copy_(2, self.write_index, value_states.to(v.dtype))
        except NotImplementedError:  # MPS without index_copy_
            k[:, :, self.write_index] = key_states.to(k.dtype)
            v[:, :, self.write_index] = value_states.to(v.dtype)
        if self.limit is not None:
            return k[:, :, : self.limit], v[:, :, : self.limit]
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:
        return len(self.keys)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values]


SLOT_ATTENTION = "pmetal_slot_sdpa"
SLOT_KERNEL_ATTENTION = "pmetal_slot_kernel"
SMALL_QUERY = 16  # query rows per KV head up to which rounds count as decode rounds (matmuls or the kernel)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA over the slot cache with grouped-query heads folded into the query length.

    ``query [B, Hq, T, D]``, ``key/value [B, Hkv, C, D]``, ``attention_mask [B, 1, T, C]`` (bool).
    transformers' SDPA path repeats K and V to ``Hq`` heads whenever a mask is given (a full copy
    of the cache per layer and token); viewing the ``Hq / Hkv`` query heads of each KV head as
    extra query rows reads the cache once. Returns ``[B, T, Hq, D]`` as attention functions do.
    """
    b, hq, t, d = query.shape
    hkv, capacity = key.shape[1], key.shape[2]
    group = hq // hkv
    q = query.reshape(b, hkv, group * t, d)  # head h = kv * group + j, as transformers' repeat_kv orders them
    mask = attention_mask[:, :, None].expand(b, 1, group, t, capacity).reshape(b, 1, group * t, capacity)
    if query.is_cuda and group * t <= SMALL_QUERY:
        # A decode or verify round: a few query rows against the whole cache. Fused SDPA kernels tile
        # over the query and leave most of each tile empty; two batched matmuls read the cache once
        # at full bandwidth. The scores are softmaxed in float32, as the fused kernels do.
        scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scaling if scaling is not None else d ** -0.5)
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, t, d).transpose(1, 2).contiguous(), None


def slot_kernel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """:func:`slot_attention`, with decode and verify rounds through the Triton decode-attention kernel
    (the engine chose it where the kernel runs, and prepared it before any compilation)."""
    from pmetal.generation import decode_attention as kernel

    group_rows = (query.shape[1] // key.shape[1]) * query.shape[2]
    if group_rows <= SMALL_QUERY and attention_mask is not None and attention_mask.dtype == torch.bool:
        return kernel.decode_attention(query, key, value, attention_mask, scaling), None
    return slot_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _register_slot_attention() -> bool:
    return (register_attention(SLOT_ATTENTION, slot_attention)
            and register_attention(SLOT_KERNEL_ATTENTION, slot_kernel_attention))


def use_slot_attention(model, kernel: bool = False) -> dispatch_attention:
    """Within the block, ``model``'s attention layers dispatch to :func:`slot_attention`
    (``kernel=True``: :func:`slot_kernel_attention`)."""
    return dispatch_attention(model, SLOT_KERNEL_ATTENTION if kernel else SLOT_ATTENTION, _register_slot_attention)
