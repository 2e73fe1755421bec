"""Per-row sampling for the decode session: each row its own temperature, top-k, top-p, min-p and seed.

:func:`sample_rows` draws one token per row from ``[rows, V]`` logits, every setting a ``[rows]``
tensor, so one fixed-shape round serves rows with different settings (and a CUDA graph captures
it once). The distribution is :func:`pmetal.generation.sampling.process_logits`' (suppression, then
temperature, top-k, top-p, min-p, in Hugging Face's order), taken per row in sorted order; greedy
rows take the argmax. The recorded log-prob is the full tempered ``log_softmax(logits / T)`` of the
chosen token, as the engine records it (``T = 1`` for greedy rows).

The draw is the Gumbel-max race (``argmax(log p + G)``, exactly a draw from ``p``), with uniforms
from a **counter-based hash** of ``(row seed, position of the sampled token, vocabulary index)``
(SplitMix64's finalizer, in int64 tensor ops): a row's draws depend on its seed and positions only,
never on which other rows share the round, so joining a running batch changes no row's sample,
a seeded row reproduces its answer in any company, and a row extended by an appended turn samples
what a generation from the concatenated prompt with the same seed samples.

Departures: ties at the k-th largest logit keep exactly ``k`` tokens (``process_logits`` keeps all
tied ones: a measure-zero difference); uniforms have 24 bits, as ``torch.rand``'s float32 draws.
"""

from __future__ import annotations

import torch

from pmetal.generation.sampling import suppressed

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # SplitMix64's constants as signed int64 (multiplication wraps)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on negative values)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def hashed_uniforms(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` float32 uniforms in (0, 1), a pure function of each row's (seed, counter)."""
    key = _mix(_mix(seeds) + counters * _GOLDEN)  # [rows]
    index = torch.arange(1, vocab + 1, device=seeds.device, dtype=torch.long)
    z = _mix(key[:, None] + index[None, :] * _GOLDEN)
    return (_shift_right(z, 40).float() + 0.5) * (2.0 ** -24)


def _truncate(scaled: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """Per-row top-k, top-p then min-p on tempered logits (``-inf`` where dropped)."""
    vocab = scaled.shape[-1]
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    ordered = ordered.masked_fill(rank >= k, float("-inf"))
    probs = ordered.softmax(dim=-1)
    # drop a token when the tokens more likely than it already reach top_p (rows with top_p = 1 keep all)
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=-1)
    drop = (probs < min_p[:, None] * probs[:, :1]) & (min_p > 0)[:, None]  # sorted: column 0 is the max
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, ordered)


def sample_rows(logits: torch.Tensor, params: dict[str, torch.Tensor], counters: torch.Tensor,
                suppress_ids: tuple[int, ...], sampled: bool, truncated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [rows], logps [rows])`` from float32 ``logits [rows, V]`` (see the module docstring).

    ``params``: ``greedy`` (bool), ``temperature``, ``top_p``, ``min_p`` (float32), ``top_k``,
    ``seed`` (long), one value per row. ``sampled``/``truncated`` (the host knows them from the
    rows' settings) leave out the work no row needs: the greedy-only and untruncated variants.
    """
    temperature = torch.where(params["greedy"], 1.0, params["temperature"])
    clean = suppressed(logits, _Suppress(suppress_ids))
    tokens = clean.argmax(dim=-1)
    if sampled:
        scaled = clean / temperature[:, None]
        if truncated:
            scaled = _truncate(scaled, params["top_k"], params["top_p"], params["min_p"])
        u = hashed_uniforms(params["seed"], counters, logits.shape[-1])
        drawn = (scaled - torch.log(-torch.log(u))).argmax(dim=-1)
        tokens = torch.where(params["greedy"], tokens, drawn)
    logps = torch.log_softmax(logits / temperature[:, None], dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logps


class _Suppress:
    """The one field of a SamplingConfig that :func:`suppressed` reads."""

    def __init__(self, ids: tuple[int, ...]) -> None:
        self.suppress_ids = ids
