"""The decode session's cache side: a slot cache written at one column per row, the layout of a
prefill that appends tokens to rows of different kept lengths in one forward, and the bucket (the
first ``B`` rows) one fixed-shape round runs over, with its round shaped for the engine's capture.

Each session row keeps its KV contiguous from slot 0, so a token's slot is its position. A
prefill feeds each row's new tokens left-padded to one width (so the last query of every row is a
real token and one logit row per prompt is computed); padding queries write to a scratch column
past every row's end and attend only to it, so they never touch a row's KV or NaN a softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pmetal.generation.slots import SlotCache


class RowSlotCache(SlotCache):
    """A :class:`SlotCache` written at one column per row: ``write_index`` is ``[rows, T]``."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        index = self.write_index[:, None, :, None]
        k.scatter_(2, index.expand(-1, k.shape[1], -1, k.shape[3]), key_states.to(k.dtype))
        v.scatter_(2, index.expand(-1, v.shape[1], -1, v.shape[3]), value_states.to(v.dtype))
        if self.limit is not None:
            return k[:, :, : self.limit], v[:, :, : self.limit]
        return k, v


def prefill_layout(feeds: Sequence[Sequence[int]], kept: Sequence[int], device) -> dict[str, torch.Tensor | int]:
    """The tensors of one forward appending ``feeds[i]`` after the ``kept[i]`` slots row ``i`` keeps.

    Returns ``ids``, ``positions``, ``write`` (each ``[n, T]``), ``mask`` (``[n, 1, T, span + 1]``
    bool: causal over the kept and new slots) and ``span`` (the scratch column, one past the
    longest row after the forward).
    """
    lengths = torch.tensor([len(f) for f in feeds], device=device)
    keeps = torch.tensor(list(kept), device=device)
    width = int(lengths.max())
    span = max(k + len(f) for k, f in zip(kept, feeds))
    ids = torch.tensor([[f[0]] * (width - len(f)) + list(f) for f in feeds], device=device)
    j = torch.arange(width, device=device)[None, :]
    first = width - lengths[:, None]
    real = j >= first  # left padding is False
    at = keeps[:, None] + (j - first)  # each real token's slot, which is its position
    cols = torch.arange(span + 1, device=device)[None, None, :]
    mask = torch.where(real[:, :, None], (cols <= at[:, :, None]) & (cols < span), cols == span)
    return {"ids": ids, "positions": at.clamp_min(0), "write": torch.where(real, at, span), "mask": mask[:, None],
            "span": span, "ends": keeps + lengths}


class Bucket:
    """Views of the session's buffers on its first ``rows`` rows: what one round shape runs over."""

    def __init__(self, session, rows: int) -> None:
        self.rows = rows
        self.state = {name: t[:rows] for name, t in session.state.items()}
        self.col = self.state["col"]
        self.cache = RowSlotCache([k[:rows] for k in session.keys], [v[:rows] for v in session.values])
        self.graphs: dict[tuple, object] = {}


class RoundCall:
    """One round of a bucket in a variant, shaped as the engine's capture expects of a round."""

    generator = None  # the round draws from hashed uniforms, no generator state

    def __init__(self, session, variant: tuple[bool, bool]) -> None:
        self.session, self.variant, self.kv_limit = session, variant, None

    def __call__(self, bucket: Bucket) -> None:
        self.session._decode_round(bucket, self.variant, self.kv_limit)

    def snapshot(self):
        return None

    def restore(self, saved) -> None:
        pass
