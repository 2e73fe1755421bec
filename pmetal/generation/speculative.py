"""The engine's fixed-shape round, with speculative drafting as an option.

A round feeds the last sampled token (and, under speculation, ``K`` drafted tokens) to the policy
in one forward, then emits between 1 and ``K + 1`` tokens per row. Without speculation ``K = 0``
and a round is one plain decode step. Every shape is fixed, every decision is a tensor op, so a
round can be captured into a CUDA graph.

Speculative sampling: Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative
Decoding", arXiv:2211.17192, Algorithm 1) and Chen et al. 2023 (arXiv:2302.01318). Draft token
``d_j ~ q_j``; it is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first
rejection the token is drawn from ``norm(max(0, p_j - q_j))``, and when all ``K`` are accepted a
bonus token is drawn from ``p_{K+1}``. Completions are then distributed exactly as the policy's
sampler (``p`` is the same tempered, top-k/top-p/min-p-truncated distribution). Drafts:

- a draft model with the same tokenizer (its own slot cache, over the same slots and mask);
- without one, prompt lookup: the ``K`` tokens that followed the latest earlier occurrence of the
  last 3 (else 2, else 1) tokens of the prompt + completion; ``q`` is then one-hot, so the rule
  reads: accept with probability ``p(d)``, and on rejection draw from ``p`` with ``d`` removed.

Departures: the recorded log-prob of every emitted token is the policy's own, from the verify
forward (a K+1-token forward: equal to a one-token forward up to kernel numerics). Rejected draft
slots stay in the cache as holes in the row's ``valid`` bitmap, compacted when the capacity runs out.
"""

from __future__ import annotations

import contextlib

import torch

from pmetal.generation.slots import use_slot_attention
from pmetal.generation.sampling import (SamplingConfig, forward_kwargs, process_logits, race as _race,
                                        sampling_probs as _probs, suppressed)

NGRAM_SIZES = (3, 2, 1)


def check_draft_settings(speculative: bool, draft_model, num_draft_tokens: int) -> None:
    """The engine options that are wrong on their face, before anything is loaded."""
    if draft_model is not None and not speculative:
        raise ValueError("a draft model is only used with speculative=True (--speculative)")
    if speculative and (not isinstance(num_draft_tokens, int) or num_draft_tokens < 1):
        raise ValueError(f"num_draft_tokens must be at least 1 (the tokens drafted per round), got {num_draft_tokens!r}")


def check_draft_tokenizer(tokenizer, draft_tokenizer, draft_name: str) -> None:
    """A draft must share the policy's tokenizer: its token ids are proposed to the policy as they are."""
    if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        ours, theirs = len(tokenizer.get_vocab()), len(draft_tokenizer.get_vocab())
        raise ValueError(f"draft model {draft_name!r} has another tokenizer ({theirs} tokens vs the policy's {ours}, "
                         "or the same size with other ids): speculative decoding needs the same vocabulary")


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
        self.arange = torch.arange(max(k + 1, max(NGRAM_SIZES)), device=device)
        self.cols = torch.arange(spec.capacity, device=device)
        self.kv_limit: int | None = None  # set by the engine per eager round (None: whole capacity)
        self.temperature = config.temperature if config.temperature > 0 else 1.0
        self.vocab_size = engine.vocab_size
        self._kwargs = {id(m): self._model_kwargs(m) for m in (engine.model, engine.draft_model) if m is not None}

    @staticmethod
    def _model_kwargs(model):
        cache_kw, has_keep = forward_kwargs(model)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        return cache_kw, has_keep, impl == "eager"

    # ------------------------------------------------------------------ the round
    def __call__(self, ws) -> None:
        s, k = ws.state, self.k
        slots = ws.col + self.arange[: k + 1]  # [T]
        live = ~s["finished"]
        s["valid"].index_copy_(1, slots, live[:, None].expand(ws.rows, k + 1).contiguous())
        drafts, q = None, None
        if k and self.engine.draft_model is not None:
            drafts, q = self._draft_with_model(ws, slots)
        elif k:
            drafts = self._draft_from_ngrams(ws)
        ids = s["tok"][:, None] if drafts is None else torch.cat([s["tok"][:, None], drafts], dim=1)
        logits = self._forward(self.engine.model, ws.cache, ids, s["pos"][:, None] + self.arange[None, : k + 1], slots, ws)
        logp = None
        if k:
            accepted, emitted = self._verify(self._sampling_probs(logits), drafts, q)  # p: [rows, T, V]
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
        emitted = _race(self._sampling_probs(logits), self.generator)[:, None]
        live = ~ws.state["finished"]
        self._emit(ws, emitted, logits[:, None, :], torch.zeros_like(emitted[:, 0]), live, count=False)

    def _verify(self, p, drafts, q):
        """Exact acceptance: ``(accepted [rows], emitted [rows, K+1])``, the new token at index ``accepted``."""
        rows, k, vocab = drafts.shape[0], self.k, p.shape[-1]
        p_d = p[:, :k].gather(2, drafts[..., None]).squeeze(2)  # [rows, K]
        q_d = q.gather(2, drafts[..., None]).squeeze(2) if q is not None else torch.ones_like(p_d)
        u = torch.rand(p_d.shape, device=p.device, generator=self.generator)
        accepted = (u * q_d < p_d).long().cumprod(dim=1).sum(dim=1)  # [rows]
        at = accepted[:, None, None].expand(rows, 1, vocab)
        p_a = p.gather(1, at).squeeze(1)  # [rows, V]
        if q is not None:
            q_a = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1).gather(1, at).squeeze(1)
        else:
            d_a = torch.cat([drafts, drafts[:, :1]], dim=1).gather(1, accepted[:, None])
            q_a = torch.zeros_like(p_a).scatter_(1, d_a, (accepted < k).to(p_a.dtype)[:, None])
        residual = (p_a - q_a).clamp_min(0.0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)
        new = _race(residual, self.generator)
        emitted = torch.cat([drafts, new[:, None]], dim=1).scatter(1, accepted[:, None], new[:, None])
        return accepted, emitted

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

    def _sampling_probs(self, logits):
        return (self.engine.compiled(_probs) or _probs)(logits, self.config)

    # ------------------------------------------------------------------ forwards and drafts
    def _forward(self, model, cache, ids, positions, slots, ws) -> torch.Tensor:  # [rows, T, V] float32
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

    def _draft_with_model(self, ws, slots):
        s, draft = ws.state, self.engine.draft_model
        current, drafts, qs = s["tok"], [], []
        for j in range(self.k + 1):  # the (K+1)-th forward only writes the last draft's KV
            logits = self._forward(draft, ws.draft_cache, current[:, None], (s["pos"] + j)[:, None], slots[j: j + 1], ws)
            if j == self.k:
                break
            q = self._sampling_probs(logits[:, 0])
            current = _race(q, self.generator)
            drafts.append(current)
            qs.append(q)
        drafts, q = torch.stack(drafts, dim=1), torch.stack(qs, dim=1)  # [rows, K], [rows, K, Vq]
        vocab = self.vocab_size
        if q.shape[-1] != vocab:  # a draft head padded differently: tokens beyond the policy's are rejected
            q = torch.nn.functional.pad(q, (0, max(0, vocab - q.shape[-1])))[..., :vocab]
            drafts = drafts.clamp_max(vocab - 1)
        return drafts, q

    def _draft_from_ngrams(self, ws) -> torch.Tensor:  # [rows, K]
        seq = ws.state["seq"]
        rows, width = seq.shape
        length = self.seq_base + ws.state["gen_len"]  # [rows]: tokens [0, length) are known
        starts = torch.arange(width, device=seq.device)
        proposal = torch.zeros((rows, self.k), dtype=torch.long, device=seq.device)
        found = torch.zeros(rows, dtype=torch.bool, device=seq.device)
        for n in NGRAM_SIZES:
            tail = seq.gather(1, (length[:, None] - n + self.arange[None, :n]).clamp_min(0))  # [rows, n]
            windows = seq.unfold(1, n, 1)  # [rows, width - n + 1, n]
            match = (windows == tail[:, None, :]).all(dim=2) & (starts[None, : width - n + 1] + n < length[:, None])
            match &= (tail >= 0).all(dim=1, keepdim=True)
            best = torch.where(match, starts[None, : width - n + 1], -1).max(dim=1).values  # the latest match
            follow = (best[:, None] + n + self.arange[None, : self.k]).clamp(0, width - 1)
            use = (best >= 0) & ~found
            proposal = torch.where(use[:, None], seq.gather(1, follow).clamp_min(0), proposal)
            found |= use
        return proposal

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


