"""The decode session: continuous batching on the rollout engine's slot cache.

A session owns ``rows`` decode rows of ``capacity`` KV slots each (one preallocated
``[rows, kv_heads, capacity, head_dim]`` buffer per layer, as the engine's workspaces). Rows come
and go while the others keep their KV:

- ``add(prompt_ids, config, stop_ids=..., seed=...)`` takes a free row; its prompt is prefilled into
  that row at the next ``step()`` (the newcomers of one step in one forward), and its first token
  sampled;
- ``step()`` runs ``sync_every`` decode rounds over the live rows and returns each row's new tokens
  and log-probs, and the rows that finished (a stop token, or ``max_new_tokens``, or a full row);
- ``remove(row)`` frees a row at once (a client gone, an answer done);
- ``pause(row)`` stops a live row and keeps its KV; ``extend(row, token_ids, at=...)`` appends tokens
  (a tool's result) to a finished or paused row on top of its kept prefix (cut back to ``at`` tokens
  first, if given) and decodes on from there: no re-prefill of the conversation.

Layout: each row's KV is contiguous from slot 0 (slot = position), written at a per-row column
(``RowSlotCache``), so rows of any lengths and ages share one fixed-shape round; the mask is the
per-row ``valid`` bitmap, as in the engine. Per-row sampling (:mod:`pmetal.generation.rowsampling`):
temperature, top-k, top-p, min-p and seed are ``[rows]`` tensors; one round serves every mix, in
three variants (all greedy; sampled; sampled with truncation) picked on the host per step.
A row's draws depend on its seed and positions only, so joining changes no row's sample.

Shapes: a round runs over the first ``B`` rows, ``B`` the power of two covering the live rows
(live rows are moved down into free slots when they fit a smaller ``B``), over the whole
capacity. On CUDA each (``B``, variant) round is captured once into a CUDA graph (through the
engine's capture, compiled first where the engine compiles) and replayed; on CPU and MPS the
same round runs eagerly, attending to the columns written so far. Prefill runs eagerly (its
shapes follow the prompts), through the same slot attention, into a scratch copy of the rows it
feeds. The host reads the device once per ``step()``.

Departures from :func:`pmetal.generation.engine.generate`: no speculation, no VLM inputs, and
models the engine cannot serve (sliding-window or hybrid caches) are refused; ``suppress_ids``
are one set per session. Sampled draws come from a hash of (seed, position), not from a
``torch.Generator``: the same distribution, other draws.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pmetal.generation.engine import RolloutEngine, engine_supports
from pmetal.generation.rowcache import Bucket, RoundCall, RowSlotCache, prefill_layout
from pmetal.generation.rowsampling import sample_rows
from pmetal.generation.hf_internals import attn_implementation, cache_layers, forward_kwargs, output_cache
from pmetal.generation.round import model_logits
from pmetal.generation.sampling import SamplingConfig
from pmetal.generation.slots import use_slot_attention

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward (more newcomers: several forwards)
PARAMS = ("greedy", "temperature", "top_p", "top_k", "min_p", "seed")


class SessionFull(RuntimeError):
    """``add`` found no free row (``remove`` finished rows to free theirs)."""


@dataclass
class RowEvent:
    """What one row did during a ``step()``: its new tokens (the stop token included) and their log-probs."""

    row: int
    tokens: list[int]
    logps: list[float]
    finish: str | None = None  # "stop" (a stop token) or "length" (its budget, or its row full); None: running


@dataclass(eq=False)
class _Row:
    handle: int
    slot: int
    seq: list[int]  # prompt, generated and appended tokens; all but the last are in the KV once it runs
    config: SamplingConfig
    stop_ids: tuple[int, ...]
    seed: int
    state: str = "pending"  # pending (to prefill) -> live -> finished (KV kept) ; removed rows are gone
    cached: int = 0  # tokens of seq in the KV
    feed: list[int] = field(default_factory=list)  # tokens the next prefill writes after `cached`
    budget: int = 0


class DecodeSession:
    """Continuous batching over ``rows`` rows of ``capacity`` KV slots (see the module docstring).

    Args:
        model: a Hugging Face causal LM (PEFT-wrapped or not) the engine serves (call ``eval()``).
        rows: the most rows decoding or kept at once.
        capacity: KV slots per row: a row's prompt, generated and appended tokens together.
        sync_every: decode rounds per ``step()`` (the host reads the device once per step).
        suppress_ids: token ids never sampled, for every row.
        max_stop_ids: the most stop ids one row may have.
        generator: draws the seeds of rows added without one (None: torch's default generator).
        cuda_graphs, compile_decode, attention_kernel, fuse_projections: as for
            :class:`pmetal.generation.engine.RolloutEngine` (None: its defaults for the device).
    """

    def __init__(self, model, rows: int, capacity: int, *, sync_every: int = 1, suppress_ids: Sequence[int] = (),
                 max_stop_ids: int = 8, generator: torch.Generator | None = None, cuda_graphs: bool | None = None,
                 compile_decode: bool | None = None, attention_kernel: bool | None = None,
                 fuse_projections: bool | None = None) -> None:
        if rows < 1 or capacity < 2 or sync_every < 1:
            raise ValueError(f"a session needs rows >= 1, capacity >= 2 and sync_every >= 1, "
                             f"got {rows}, {capacity}, {sync_every}")
        if not engine_supports(model):
            raise ValueError("the decode session serves models with full attention through SDPA or eager attention "
                             "(no sliding window or hybrid cache); use pmetal.generation.generate for this one")
        self.engine = RolloutEngine(model, cuda_graphs=cuda_graphs, compile_decode=compile_decode,
                                    attention_kernel=attention_kernel, fuse_projections=fuse_projections)
        self.model, self.device = model, self.engine.device
        self.rows, self.capacity, self.sync_every = rows, capacity, sync_every
        self.suppress_ids, self.max_stop_ids = tuple(int(i) for i in suppress_ids), max_stop_ids
        self.generator = generator
        self._kwargs = forward_kwargs(model)
        self._additive = attn_implementation(model) == "eager"
        self.keys, self.values = self._allocate_cache(model)
        long, dev = dict(dtype=torch.long, device=self.device), self.device
        width = sync_every + 1  # a step emits a prefill's first token and one token per round
        self.state = {
            "tok": torch.zeros(rows, **long), "col": torch.zeros(rows, **long),
            "gen_len": torch.zeros(rows, **long), "budget": torch.ones(rows, **long),
            "finished": torch.ones(rows, dtype=torch.bool, device=dev),
            "stopped": torch.zeros(rows, dtype=torch.bool, device=dev),
            "valid": torch.zeros(rows, capacity, dtype=torch.bool, device=dev),
            "stops": torch.full((rows, max_stop_ids), -1, **long),
            "greedy": torch.ones(rows, dtype=torch.bool, device=dev),
            "temperature": torch.ones(rows, device=dev), "top_p": torch.ones(rows, device=dev),
            "top_k": torch.zeros(rows, **long), "min_p": torch.zeros(rows, device=dev),
            "seed": torch.zeros(rows, **long),
            "out_tok": torch.zeros(rows, width, **long), "out_logp": torch.zeros(rows, width, device=dev),
            "n_out": torch.zeros(rows, **long),
        }
        self._cols = torch.arange(capacity, device=dev)
        self._slots: list[_Row | None] = [None] * rows
        self._rows: dict[int, _Row] = {}
        self._handles = itertools.count()
        self._buckets: dict[int, Bucket] = {}
        self.rounds = 0  # decode rounds run so far
        self.prefilled = 0  # tokens prefilled so far (prompts, and what extend() appended)
        self.refresh()

    # ------------------------------------------------------------------ the API
    def add(self, prompt_ids: Sequence[int], config: SamplingConfig, *, stop_ids: Sequence[int] = (),
            seed: int | None = None) -> int:
        """A row for ``prompt_ids`` (prefilled at the next ``step()``); returns its handle.

        ``config.max_new_tokens`` is the row's budget; ``seed`` fixes its sampled draws (None: one
        drawn from the session's generator). Raises :class:`SessionFull` without a free row."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if len(prompt) > self.capacity:
            raise ValueError(f"the prompt has {len(prompt)} tokens; a row holds {self.capacity}")
        self._check(config, stop_ids)
        slot = next((i for i, r in enumerate(self._slots) if r is None), None)
        if slot is None:
            raise SessionFull(f"all {self.rows} rows are taken; remove finished rows first")
        if seed is None:
            seed = int(torch.randint(0, 1 << 62, (1,), generator=self.generator))
        row = _Row(next(self._handles), slot, list(prompt), config, tuple(int(s) for s in stop_ids), int(seed),
                   feed=list(prompt), budget=config.max_new_tokens)
        self._slots[slot] = self._rows[row.handle] = row
        return row.handle

    def extend(self, row: int, token_ids: Sequence[int], *, at: int | None = None,
               max_new_tokens: int | None = None) -> None:
        """Append ``token_ids`` to a finished or paused row and decode on from them at the next ``step()``.

        The row's sequence (``tokens(row)``) is first cut to its first ``at`` tokens (None: kept
        whole); the KV of the kept prefix is reused, only the new tokens are prefilled. The row
        keeps its sampling settings, seed and stop ids; ``max_new_tokens`` (None: its config's)
        is the budget of the new turn."""
        r = self._get(row)
        if r.state != "finished":
            raise ValueError(f"row {row} is {r.state}: only a finished or paused row can be extended")
        length = len(r.seq) if at is None else int(at)
        if not 0 <= length <= len(r.seq):
            raise ValueError(f"at={at} is outside row {row}'s {len(r.seq)} tokens")
        new = [int(t) for t in token_ids]
        keep = min(length, r.cached)
        feed = r.seq[keep:length] + new
        if not feed:  # nothing new: feed the last kept token again, for the logits of the next one
            if keep == 0:
                raise ValueError("extend() needs tokens: the row would be empty")
            keep -= 1
            feed = [r.seq[keep]]
        if keep + len(feed) > self.capacity:
            raise ValueError(f"row {row} would hold {keep + len(feed)} tokens; a row holds {self.capacity}")
        r.seq, r.cached, r.feed, r.state = r.seq[:length] + new, keep, feed, "pending"
        r.budget = max_new_tokens if max_new_tokens is not None else r.config.max_new_tokens
        if r.budget < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {r.budget}")

    def pause(self, row: int) -> None:
        """Stop decoding a live row, keeping its KV (``extend`` continues it)."""
        r = self._get(row)
        if r.state == "live":
            self.state["finished"][r.slot] = True
            r.state = "finished"

    def remove(self, row: int) -> None:
        """Free ``row`` (any state): it stops decoding at once and its slot takes the next ``add``."""
        r = self._rows.pop(row, None)
        if r is None:
            return
        self.state["finished"][r.slot] = True
        self._slots[r.slot] = None

    def tokens(self, row: int) -> list[int]:
        """The row's sequence: prompt, generated and appended tokens."""
        return list(self._get(row).seq)

    def status(self, row: int) -> str:
        """"pending" (prefilled at the next step), "live" or "finished" (stopped or paused; KV kept)."""
        return self._get(row).state

    @property
    def free_rows(self) -> int:
        return sum(r is None for r in self._slots)

    @property
    def active(self) -> int:
        """Rows the next ``step()`` works on (pending or live)."""
        return sum(r.state in ("pending", "live") for r in self._rows.values())

    def refresh(self) -> None:
        """Re-read the live weights into the fused projections (after an optimizer step)."""
        fused = self.engine.fused(self.model)
        if fused is not None:
            fused.refresh()

    @torch.no_grad()
    def step(self, rounds: int | None = None) -> list[RowEvent]:
        """Prefill the rows added or extended since the last step, run ``rounds`` (default
        ``sync_every``, at most it) decode rounds over the live rows, and return what each did."""
        rounds = self.sync_every if rounds is None else max(1, min(rounds, self.sync_every))
        self.state["n_out"].zero_()
        pending = [r for r in self._rows.values() if r.state == "pending"]
        if pending:
            per_forward = max(1, PREFILL_TOKENS // max(len(r.feed) for r in pending))
            self.prefilled += sum(len(r.feed) for r in pending)
            for start in range(0, len(pending), per_forward):
                self._prefill(pending[start: start + per_forward])
        live = [r for r in self._rows.values() if r.state == "live"]
        if not live:
            return []
        bucket = self._bucket(self._pack(live))
        variant, longest = _variant(live), max(r.cached for r in live)
        for i in range(rounds):
            self._round(bucket, variant, min(self.capacity, longest + i + 1))
        self.rounds += rounds
        return self._collect(live)

    # ------------------------------------------------------------------ internals
    def _get(self, row: int) -> _Row:
        if row not in self._rows:
            raise KeyError(f"row {row} is not in this session (removed, or never added)")
        return self._rows[row]

    def _check(self, config: SamplingConfig, stop_ids) -> None:
        if config.suppress_ids and tuple(config.suppress_ids) != self.suppress_ids:
            raise ValueError(f"suppress_ids are one set per session ({self.suppress_ids}); "
                             f"this row asks for {config.suppress_ids}")
        if len(set(stop_ids)) > self.max_stop_ids:
            raise ValueError(f"a row takes at most {self.max_stop_ids} stop ids, got {len(set(stop_ids))}")

    def _allocate_cache(self, model):
        """Zeroed ``[rows, kv_heads, capacity, head_dim]`` keys and values per layer, shaped as the model's
        own prompt cache (read from a one-token forward)."""
        from pmetal.generation.sampling import prompt_forward

        _, _, _, out, cache = prompt_forward(model, [[0]], 0, self.device)
        layers = cache_layers(output_cache(out, cache))
        if layers is None:
            raise ValueError("the model's prompt cache has no per-layer tensors: the decode session cannot serve it")
        make = lambda t: torch.zeros(self.rows, t.shape[1], self.capacity, t.shape[3], dtype=t.dtype,  # noqa: E731
                                     device=self.device)
        return [make(k) for k, _ in layers], [make(v) for _, v in layers]

    def _mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not self._additive:
            return mask
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def _attention(self):
        fused = self.engine.fused(self.model)
        stack = contextlib.ExitStack()
        stack.enter_context(use_slot_attention(self.model, kernel=self.engine.attention_kernel))
        if fused is not None:
            stack.enter_context(fused)
        return stack

    def _sampler(self):
        return self.engine.compiled(sample_rows) or sample_rows

    def _write_settings(self, rows: list[_Row], slots: torch.Tensor) -> None:
        s, dev = self.state, self.device
        values = {
            "greedy": [r.config.temperature == 0 for r in rows], "temperature": [r.config.temperature for r in rows],
            "top_p": [r.config.top_p for r in rows], "top_k": [r.config.top_k for r in rows],
            "min_p": [r.config.min_p for r in rows], "seed": [r.seed for r in rows],
            "budget": [r.budget for r in rows],
            "stops": [list(sorted(set(r.stop_ids))) + [-1] * (self.max_stop_ids - len(set(r.stop_ids))) for r in rows],
        }
        for name, value in values.items():
            s[name].index_copy_(0, slots, torch.tensor(value, dtype=s[name].dtype, device=dev))

    def _prefill(self, rows: list[_Row]) -> None:
        """Write each row's ``feed`` after its kept ``cached`` tokens (one forward, left-padded) and
        sample its first token: into a scratch copy of those rows' caches, then copied back."""
        s, dev, n = self.state, self.device, len(rows)
        slots = torch.tensor([r.slot for r in rows], device=dev)
        self._write_settings(rows, slots)
        layout = prefill_layout([r.feed for r in rows], [r.cached for r in rows], dev)
        kept, span = max(r.cached for r in rows), layout["span"]
        scratch = [torch.zeros(n, t.shape[1], span + 1, t.shape[3], dtype=t.dtype, device=dev)
                   for t in self.keys + self.values]
        for src, dst in zip(self.keys + self.values, scratch if kept else []):
            dst[:, :, :kept] = src.index_select(0, slots)[:, :, :kept]
        cache = RowSlotCache(scratch[: len(self.keys)], scratch[len(self.keys):])
        cache.write_index = layout["write"]
        cache_kw, has_keep = self._kwargs
        extra = {"logits_to_keep": 1} if has_keep else {}
        with self._attention():
            out = self.model(input_ids=layout["ids"], attention_mask=self._mask(layout["mask"]),
                             position_ids=layout["positions"], use_cache=True, **{cache_kw: cache}, **extra)
        logits = out.logits[:, -1, :].float()
        for src, dst in zip(scratch, self.keys + self.values):
            dst[:, :, :span].index_copy_(0, slots, src[:, :, :span])
        ends = layout["ends"]
        params = {name: s[name].index_select(0, slots) for name in PARAMS}
        tokens, logps = self._sampler()(logits, params, ends, self.suppress_ids, *_variant(rows))
        hit = (tokens[:, None] == s["stops"].index_select(0, slots)).any(dim=1)
        s["valid"].index_copy_(0, slots, self._cols[None, :] < ends[:, None])
        for name, value in (("tok", tokens), ("col", ends), ("gen_len", torch.ones_like(ends)),
                            ("n_out", torch.ones_like(ends)), ("stopped", hit),
                            ("finished", hit | (s["budget"].index_select(0, slots) <= 1) | (ends >= self.capacity))):
            s[name].index_copy_(0, slots, value)
        s["out_tok"][:, 0].index_copy_(0, slots, tokens)
        s["out_logp"][:, 0].index_copy_(0, slots, logps)
        for r in rows:
            r.cached, r.feed, r.state = r.cached + len(r.feed), [], "live"

    def _decode_round(self, bucket: Bucket, variant: tuple[bool, bool], kv_limit: int | None) -> None:
        """One decode step of every row of ``bucket``: feed each row's last token, sample the next."""
        s, capacity = bucket.state, self.capacity
        live = ~s["finished"]
        column = s["col"].clamp_max(capacity - 1)[:, None]  # a full, finished row writes nowhere it keeps
        s["valid"].scatter_(1, column, live[:, None])
        limit = kv_limit or capacity
        mask = (s["valid"][:, :limit] | (self._cols[None, :limit] == column))[:, None, None, :]
        cache = bucket.cache
        cache.write_index, cache.limit = column, kv_limit
        forward = self.engine.compiled_forward(self.model) or model_logits
        cache_kw, has_keep = self._kwargs
        with self._attention():
            logits = forward(self.model, cache_kw, has_keep, s["tok"][:, None], self._mask(mask), column, cache)[:, 0]
        params = {name: s[name] for name in PARAMS}
        tokens, logps = self._sampler()(logits, params, s["col"] + 1, self.suppress_ids, *variant)
        emitted = live.long()
        out = s["n_out"].clamp_max(s["out_tok"].shape[1] - 1)[:, None]
        s["out_tok"].scatter_(1, out, tokens[:, None])
        s["out_logp"].scatter_(1, out, logps[:, None])
        s["n_out"].add_(emitted)
        s["col"].add_(emitted)
        s["gen_len"].add_(emitted)
        s["tok"].copy_(torch.where(live, tokens, s["tok"]))
        hit = live & (tokens[:, None] == s["stops"]).any(dim=1)
        s["stopped"].logical_or_(hit)
        s["finished"].logical_or_(hit | (live & ((s["gen_len"] >= s["budget"]) | (s["col"] >= capacity))))

    def _round(self, bucket: Bucket, variant: tuple[bool, bool], kv_limit: int) -> None:
        if self.engine.cuda_graphs:
            graph = bucket.graphs.get(variant)
            if graph is None:
                graph = bucket.graphs[variant] = self.engine._capture(bucket, RoundCall(self, variant))
            if graph is not False:
                graph.replay()
                return
        compiled = self.engine.compiled_forward(self.model) is not None
        self._decode_round(bucket, variant, None if compiled else kv_limit)  # compiled: one shape, whole capacity

    def _bucket(self, rows: int) -> Bucket:
        if rows not in self._buckets:
            self._buckets[rows] = Bucket(self, rows)
        return self._buckets[rows]

    def _pack(self, live: list[_Row]) -> int:
        """The round's rows: the power of two covering the live rows, moved below it if they fit."""
        target = min(self.rows, 1 << (len(live) - 1).bit_length())
        spare = [i for i in range(target) if self._slots[i] is None or self._slots[i].state != "live"]
        for r in [r for r in live if r.slot >= target]:
            self._swap(r.slot, spare.pop(0))
        return target

    def _swap(self, a: int, b: int) -> None:
        """Exchange slots ``a`` and ``b`` (state and KV)."""
        order = torch.tensor([b, a], device=self.device)
        pair = torch.tensor([a, b], device=self.device)
        for t in [*self.state.values(), *self.keys, *self.values]:
            t.index_copy_(0, pair, t.index_select(0, order))
        self._slots[a], self._slots[b] = self._slots[b], self._slots[a]
        for i in (a, b):
            if self._slots[i] is not None:
                self._slots[i].slot = i

    def _collect(self, live: list[_Row]) -> list[RowEvent]:
        """One read of the device: each live row's tokens this step, and whether it finished."""
        s = self.state
        slots = torch.tensor([r.slot for r in live], device=self.device)
        counts = torch.stack([s["n_out"], s["finished"].long(), s["stopped"].long()], dim=1).index_select(0, slots)
        counts, tokens, logps = counts.tolist(), s["out_tok"].index_select(0, slots).tolist(), \
            s["out_logp"].index_select(0, slots).tolist()
        events = []
        for r, (count, finished, stopped), toks, lps in zip(live, counts, tokens, logps):
            r.seq += toks[:count]
            r.cached = len(r.seq) - 1
            finish = None
            if finished:
                r.state, finish = "finished", "stop" if stopped else "length"
            if count or finish:
                events.append(RowEvent(r.handle, toks[:count], lps[:count], finish))
        return events


def _variant(rows: list[_Row]) -> tuple[bool, bool]:
    """``(sampled, truncated)``: the round variant these rows need (greedy only, sampled, with top-k/p, min-p)."""
    sampled = any(r.config.temperature > 0 for r in rows)
    return sampled, sampled and any(r.config.top_k or r.config.top_p < 1 or r.config.min_p for r in rows)
