"""The engine's fixed-shape round: one forward over the slot cache, then the tokens it emits.

A round feeds the last sampled token (and, under speculation, ``K`` drafted tokens:
:mod:`pmetal.generation.speculative`) to the policy in one forward, then emits between 1 and
``K + 1`` tokens per row. Without speculation ``K = 0`` and a round is one plain decode step: the
exponential race in log space (:func:`sample_and_score`). Every shape is fixed, every decision is a
tensor op, so a round can be captured into a CUDA graph. The recorded log-prob of every emitted
token is the policy's own, ``log_softmax(logits / T)`` of the forward that emitted it.
"""

from __future__ import annotations

import contextlib

import torch

from pmetal.generation import speculative
from pmetal.generation.slots import use_slot_attention
from pmetal.generation.hf_internals import attn_implementation, forward_kwargs
from pmetal.generation.sampling import (SamplingConfig, process_logits, race as _race,
                                        sampling_probs as _probs, suppressed)

def model_logits(model, cache_kw: str, has_keep: bool, ids, mask, positions, cache) -> torch.Tensor:
    """The float32 logits ``[rows, T, V]`` of one decode forward over the slot cache (what the engine compiles)."""
    extra = {"logits_to_keep": ids.shape[1]} if has_keep else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}, **extra)
    return out.logits[:, -ids.shape[1]:, :].float()


def chosen_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` of ``tokens`` (``[rows, T, V]``, ``[rows, T]``): the log-prob training computes."""
    return torch.log_softmax(logits / temperature, dim=-1).gather(2, tokens[..., None]).squeeze(2)


def sample_and_score(logits: torch.Tensor, uniform: torch.Tensor, config: SamplingConfig,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain decode step's draw and recorded log-prob from ``[rows, V]`` logits and ``[rows, V]`` uniforms.

    The exponential race of :func:`pmetal.generation.sampling.race` in log space: ``argmax(p / E)``
    with ``E = -log(u)`` is ``argmax(log p - log E)``, and ``log p`` differs from the processed logits by
    a constant per row, so the softmax is never formed (the Gumbel-max trick: the same draw from the
    same uniforms). One function, so the compiled round reads the logits in one fused pass or two."""
    if config.temperature == 0.0:
        tokens = suppressed(logits, config).argmax(dim=-1)
    else:
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-30)))
        tokens = (process_logits(logits, config) + gumbel).argmax(dim=-1)
    return tokens, chosen_logps(logits[:, None], tokens[:, None], temperature)[:, 0]


class Round:
    """One decode round over a workspace's static buffers (see the module docstring).

    Holds what the captured graphs write to across calls: the completion buffers (indexed by the
    rows' original ids; the last column takes discarded writes), the final lengths and the counters.
    """

    def __init__(self, engine, spec, config: SamplingConfig, generator, pad_token_id: int) -> None:
        device = engine.device
        rows, k = spec.num_rows, spec.draft_tokens
        self.engine, self.config, self.generator, self.k = engine, config, generator, k
        self.width = k + 1
        self.max_new = spec.max_new_tokens
        self.seq_base = spec.prompt_width
        out_width = spec.max_new_tokens + k + 2
        self.trash = out_width - 1
        self.tokens = torch.full((rows + 1, out_width), pad_token_id, dtype=torch.long, device=device)
        self.logps = torch.zeros((rows + 1, out_width), dtype=torch.float32, device=device)
        self.final_lengths = torch.zeros(rows + 1, dtype=torch.long, device=device)
        self.final_stopped = torch.zeros(rows + 1, dtype=torch.bool, device=device)
        self.counters = torch.zeros(3, dtype=torch.long, device=device)  # accepted, live row-rounds, emitted
        self.stop = torch.as_tensor(spec.stop or (-1,), dtype=torch.long, device=device)
        self.arange = torch.arange(max(k + 1, max(speculative.NGRAM_SIZES)), device=device)
        self.cols = torch.arange(spec.capacity, device=device)
        self.kv_limit: int | None = None  # set by the engine per eager round (None: whole capacity)
        self.temperature = config.temperature if config.temperature > 0 else 1.0
        self.vocab_size = engine.vocab_size
        self._kwargs = {id(m): self._model_kwargs(m) for m in (engine.model, engine.draft_model) if m is not None}

    @staticmethod
    def _model_kwargs(model):
        cache_kw, has_keep = forward_kwargs(model)
        return cache_kw, has_keep, attn_implementation(model) == "eager"

    # ------------------------------------------------------------------ the round
    def __call__(self, ws) -> None:
        s, k = ws.state, self.k
        slots = ws.col + self.arange[: k + 1]  # [T]
        live = ~s["finished"]
        s["valid"].index_copy_(1, slots, live[:, None].expand(ws.rows, k + 1).contiguous())
        drafts, q = None, None
        if k and self.engine.draft_model is not None:
            drafts, q = speculative.draft_with_model(self, ws, slots)
        elif k:
            drafts = speculative.draft_from_ngrams(self, ws)
        ids = s["tok"][:, None] if drafts is None else torch.cat([s["tok"][:, None], drafts], dim=1)
        logits = self.forward(self.engine.model, ws.cache, ids, s["pos"][:, None] + self.arange[None, : k + 1], slots, ws)
        logp = None
        if k:
            accepted, emitted = speculative.verify(self, self.sampling_probs(logits), drafts, q)  # p: [rows, T, V]
            keep = (self.arange[None, :k] < accepted[:, None]) & live[:, None]
            s["valid"].index_copy_(1, slots[1:], keep)
        else:
            accepted = torch.zeros_like(s["tok"])
            uniform = torch.rand(logits[:, 0].shape, device=logits.device, dtype=torch.float32, generator=self.generator)
            emitted, logp = (self.engine.compiled(sample_and_score) or sample_and_score)(
                logits[:, 0], uniform, self.config, self.temperature)
            emitted, logp = emitted[:, None], logp[:, None]
        self._emit(ws, emitted, logits, accepted, live, count=True, logp=logp)
        ws.col.add_(k + 1)

    def first_token(self, ws, logits: torch.Tensor) -> None:
        """The token sampled from the prompt forward's logits (``[rows, V]``)."""
        self.counters.zero_()
        emitted = _race(self.sampling_probs(logits), self.generator)[:, None]
        live = ~ws.state["finished"]
        self._emit(ws, emitted, logits[:, None, :], torch.zeros_like(emitted[:, 0]), live, count=False)

    def _emit(self, ws, emitted, logits, accepted, live, *, count: bool, logp=None) -> None:
        """Record the emitted tokens up to a stop token or the budget; update the row state."""
        s, width = ws.state, emitted.shape[1]
        i = self.arange[None, :width]
        if logp is None:
            logp = (self.engine.compiled(chosen_logps) or chosen_logps)(logits, emitted, self.temperature)
        is_stop = torch.isin(emitted, self.stop) & (i <= accepted[:, None])
        first_stop = torch.where(is_stop.any(dim=1), is_stop.to(torch.int8).argmax(dim=1), width)
        m = torch.minimum(torch.minimum(accepted + 1, first_stop + 1), self.max_new - s["gen_len"])
        m = torch.where(live, m, 0)
        stopped_now = live & (first_stop < m)
        written = i < m[:, None]
        cols = torch.where(written, s["gen_len"][:, None] + i, self.trash)
        row_ids = s["row_ids"][:, None].expand_as(cols)
        self.tokens.index_put_((row_ids, cols), emitted)
        self.logps.index_put_((row_ids, cols), logp.float())
        seq_cols = torch.where(written, self.seq_base + s["gen_len"][:, None] + i, s["seq"].shape[1] - 1)
        s["seq"].scatter_(1, seq_cols, emitted)
        last = emitted.gather(1, (m - 1).clamp_min(0)[:, None]).squeeze(1)
        s["tok"].copy_(torch.where(m > 0, last, s["tok"]))
        s["pos"].add_(m)
        s["gen_len"].add_(m)
        s["stopped"].logical_or_(stopped_now)
        s["finished"].logical_or_(stopped_now | (s["gen_len"] >= self.max_new))
        self.final_lengths.index_put_((s["row_ids"],), s["gen_len"])
        self.final_stopped.index_put_((s["row_ids"],), s["stopped"])
        if count:
            self.counters.add_(torch.stack([torch.where(live, accepted, 0).sum(), live.sum(), m.sum()]))

    def sampling_probs(self, logits):
        return (self.engine.compiled(_probs) or _probs)(logits, self.config)

    # ------------------------------------------------------------------ the forward
    def forward(self, model, cache, ids, positions, slots, ws) -> torch.Tensor:  # [rows, T, V] float32
        cache_kw, has_keep, additive = self._kwargs[id(model)]
        cache.write_index, cache.limit = slots, self.kv_limit
        limit = self.kv_limit or self.cols.shape[0]
        valid = ws.state["valid"][:, :limit]
        mask = valid[:, None, None, :] & (self.cols[None, None, None, :limit] <= slots[None, None, :, None])
        if additive:  # eager attention adds the mask to the scores
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        forward = self.engine.compiled_forward(model) or model_logits
        fused = self.engine.fused(model)
        with use_slot_attention(model, kernel=self.engine.attention_kernel), fused or contextlib.nullcontext():
            return forward(model, cache_kw, has_keep, ids, mask, positions, cache)

    # ------------------------------------------------------------------ bookkeeping
    def snapshot(self):
        return [t.clone() for t in (self.counters, self.final_lengths, self.final_stopped)]

    def restore(self, saved) -> None:
        for t, old in zip((self.counters, self.final_lengths, self.final_stopped), saved):
            t.copy_(old)

    def stats(self, rounds: int) -> dict[str, float]:
        accepted, row_rounds, emitted = (int(v) for v in self.counters.tolist())
        stats = {"rollout/decode_rounds": float(rounds)}
        if self.k:
            stats["speculative/acceptance_rate"] = accepted / max(1, self.k * row_rounds)
            stats["speculative/tokens_per_forward"] = emitted / max(1, row_rounds)
        return stats


