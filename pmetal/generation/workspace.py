"""The engine's static buffers: one workspace per (rows, capacity) bucket, and the shape key of a family.

A workspace holds the per-row decode state, the slot KV caches (policy and draft) and, once
captured, its CUDA graph. Compaction gathers the live rows into a smaller bucket; defragmentation
moves each row's valid slots to the front when speculation has left holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pmetal.generation.slots import SlotCache


@dataclass
class DecodeSpec:
    """What one family of captured rounds is specialised on (a new value captures anew)."""

    sampling: tuple
    stop: tuple
    max_new_tokens: int
    prompt_width: int
    capacity: int
    num_rows: int  # rows of the top bucket (P x G)
    draft_tokens: int  # K (0 without speculation)
    generator: int  # id of the torch.Generator the graphs draw from (0: the default one)


class Workspace:
    """The static buffers of one bucket: per-row state, the caches, a graph once captured."""

    def __init__(self, rows: int, spec: DecodeSpec, kv_shapes, draft_kv_shapes, device) -> None:
        c, width = spec.capacity, spec.prompt_width + spec.max_new_tokens + spec.draft_tokens + 2
        long = dict(dtype=torch.long, device=device)
        self.rows = rows
        self.state = {
            "tok": torch.zeros(rows, **long), "pos": torch.zeros(rows, **long),
            "gen_len": torch.zeros(rows, **long), "row_ids": torch.zeros(rows, **long),
            "finished": torch.ones(rows, dtype=torch.bool, device=device),
            "stopped": torch.zeros(rows, dtype=torch.bool, device=device),
            "valid": torch.zeros(rows, c, dtype=torch.bool, device=device),
            "seq": torch.full((rows, width), -1, **long),  # prompt + completion, for n-gram drafting
        }
        self.cache = self._cache(rows, c, kv_shapes, device)
        self.draft_cache = self._cache(rows, c, draft_kv_shapes, device) if draft_kv_shapes else None
        self.col = torch.zeros((), **long)  # the first free slot column, on the device
        self.col_host = 0
        self.graph = None

    @staticmethod
    def _cache(rows, capacity, shapes, device) -> SlotCache:
        keys = [torch.zeros(rows, h, capacity, dk, dtype=dt, device=device) for h, dk, _, dt in shapes]
        values = [torch.zeros(rows, h, capacity, dv, dtype=dt, device=device) for h, _, dv, dt in shapes]
        return SlotCache(keys, values)

    def batched(self) -> list[torch.Tensor]:
        """Every tensor with the row dimension first (what compaction gathers)."""
        out = list(self.state.values()) + self.cache.tensors()
        return out + (self.draft_cache.tensors() if self.draft_cache is not None else [])

    def compact_into(self, dst: Workspace) -> Workspace:
        """Gather the live rows (then finished ones, to fill the bucket) into a smaller bucket."""
        order = torch.sort(self.state["finished"].to(torch.int8), stable=True).indices[: dst.rows]
        for a, b in zip(self.batched(), dst.batched()):
            b.copy_(a.index_select(0, order))
        dst.col.copy_(self.col)
        dst.col_host = self.col_host
        dst.cache.seen = self.col_host
        return dst

    def defragment(self) -> None:
        """Move each row's valid slots to the front (speculation leaves holes), freeing the tail."""
        valid = self.state["valid"]
        order = torch.sort(valid.to(torch.int8), dim=1, descending=True, stable=True).indices  # [rows, C]
        caches = [self.cache] + ([self.draft_cache] if self.draft_cache is not None else [])
        for t in [t for c in caches for t in c.tensors()]:
            t.copy_(t.gather(2, order[:, None, :, None].expand_as(t)))
        valid.copy_(valid.gather(1, order))
        used = int(valid.sum(dim=1).max())
        self.col.fill_(used)
        self.col_host = used
        self.cache.seen = used
