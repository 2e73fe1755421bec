"""Speculative rounds: the drafts and their exact acceptance (the round itself: ``round.py``).

Under speculation a round (:class:`pmetal.generation.round.Round`) feeds the last sampled token and
``K`` drafted tokens to the policy in one forward and emits between 1 and ``K + 1`` tokens per row.

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

import torch

from pmetal.generation.sampling import race as _race

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


def verify(rnd, p, drafts, q):
    """Exact acceptance of round `rnd`'s drafts: ``(accepted [rows], emitted [rows, K+1])``, the new token
    at index ``accepted``; ``p [rows, K+1, V]`` the policy's sampling distributions, ``q`` the draft's
    (None: prompt lookup, one-hot)."""
    rows, k, vocab = drafts.shape[0], rnd.k, p.shape[-1]
    p_d = p[:, :k].gather(2, drafts[..., None]).squeeze(2)  # [rows, K]
    q_d = q.gather(2, drafts[..., None]).squeeze(2) if q is not None else torch.ones_like(p_d)
    u = torch.rand(p_d.shape, device=p.device, generator=rnd.generator)
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
    new = _race(residual, rnd.generator)
    emitted = torch.cat([drafts, new[:, None]], dim=1).scatter(1, accepted[:, None], new[:, None])
    return accepted, emitted


def draft_with_model(rnd, ws, slots):
    """K tokens drafted by the draft model over its own slot cache, and its distributions ``q [rows, K, V]``."""
    s, draft = ws.state, rnd.engine.draft_model
    current, drafts, qs = s["tok"], [], []
    for j in range(rnd.k + 1):  # the (K+1)-th forward only writes the last draft's KV
        logits = rnd.forward(draft, ws.draft_cache, current[:, None], (s["pos"] + j)[:, None], slots[j: j + 1], ws)
        if j == rnd.k:
            break
        q = rnd.sampling_probs(logits[:, 0])
        current = _race(q, rnd.generator)
        drafts.append(current)
        qs.append(q)
    drafts, q = torch.stack(drafts, dim=1), torch.stack(qs, dim=1)  # [rows, K], [rows, K, Vq]
    vocab = rnd.vocab_size
    if q.shape[-1] != vocab:  # a draft head padded differently: tokens beyond the policy's are rejected
        q = torch.nn.functional.pad(q, (0, max(0, vocab - q.shape[-1])))[..., :vocab]
        drafts = drafts.clamp_max(vocab - 1)
    return drafts, q


def draft_from_ngrams(rnd, ws) -> torch.Tensor:  # [rows, K]
    """Prompt lookup: the K tokens that followed the latest earlier occurrence of the last 3, 2 or 1 tokens."""
    seq = ws.state["seq"]
    rows, width = seq.shape
    length = rnd.seq_base + ws.state["gen_len"]  # [rows]: tokens [0, length) are known
    starts = torch.arange(width, device=seq.device)
    proposal = torch.zeros((rows, rnd.k), dtype=torch.long, device=seq.device)
    found = torch.zeros(rows, dtype=torch.bool, device=seq.device)
    for n in NGRAM_SIZES:
        tail = seq.gather(1, (length[:, None] - n + rnd.arange[None, :n]).clamp_min(0))  # [rows, n]
        windows = seq.unfold(1, n, 1)  # [rows, width - n + 1, n]
        match = (windows == tail[:, None, :]).all(dim=2) & (starts[None, : width - n + 1] + n < length[:, None])
        match &= (tail >= 0).all(dim=1, keepdim=True)
        best = torch.where(match, starts[None, : width - n + 1], -1).max(dim=1).values  # the latest match
        follow = (best[:, None] + n + rnd.arange[None, : rnd.k]).clamp(0, width - 1)
        use = (best >= 0) & ~found
        proposal = torch.where(use[:, None], seq.gather(1, follow).clamp_min(0), proposal)
        found |= use
    return proposal
