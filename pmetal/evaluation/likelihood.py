"""Evaluations that score given text: loss and perplexity on SFT data, pairwise accuracy and
implicit DPO reward margins on preference data.

SFT: loss = the mean negative log-likelihood over the trained tokens (the assistant turns, as the
SFT loss masks them; pmetal.data.render), summed over every row then divided by their count (a
token mean, not a mean of row means); perplexity = exp(loss).

Preference: each side is scored by its summed completion log-prob (as DPO scores it). Pairwise
accuracy is the fraction of pairs with log p(chosen) > log p(rejected), margin the mean
difference. With an adapter, the implicit DPO reward of a completion is beta * (log p_adapter -
log p_base) (Rafailov et al., 2023, eq. 5, the base as the reference); reward accuracy and reward
margin compare chosen and rejected the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pmetal.tokens import IGNORE_INDEX


def _batches(items: Sequence, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


@torch.no_grad()
def sequence_logps(model, rows: Sequence[dict], *, pad_token_id: int, batch_size: int = 8,
                   device: torch.device | str = "cpu", prefix: str = "") -> tuple[list[float], list[int]]:
    """(summed log-prob of the label tokens, number of label tokens) per row of
    `{prefix}input_ids`/`{prefix}labels` lists."""
    from pmetal.logps import completion_logps

    sums: list[float] = []
    counts: list[int] = []
    for chunk in _batches(rows, batch_size):
        ids = [r[f"{prefix}input_ids"] for r in chunk]
        input_ids = _pad(ids, pad_token_id).to(device)
        mask = _pad([[1] * len(s) for s in ids], 0).to(device)
        labels = _pad([r[f"{prefix}labels"] for r in chunk], IGNORE_INDEX).to(device)
        out = completion_logps(model, input_ids, mask, labels)
        sums += out.sum.float().tolist()  # Python floats: the totals add up in double precision off the device
        counts += out.num_tokens.tolist()
    return sums, counts


def sft_eval(handle, rows, path: str, report, *, max_seq_len: int = 1024, batch_size: int = 8) -> None:
    """Loss and perplexity over the trained tokens, per variant (base / adapter)."""
    from pmetal.data.formats import to_sft_examples
    from pmetal.data.render import ensure_chat_template, render_sft_dataset

    fmt, examples = to_sft_examples(rows, path=path)
    if fmt != "text":
        ensure_chat_template(handle.tokenizer)
    rendered = render_sft_dataset(handle.tokenizer, rows, examples, max_seq_len=max_seq_len, path=path)
    if not rendered.rows:
        from pmetal.errors import DataError

        raise DataError(path, "no row has a token to score", expected=f"assistant answers within max_seq_len={max_seq_len}")
    report.notes.append(f"format {fmt}: {len(rendered.rows)} rows, {rendered.trained_tokens()} scored (assistant) tokens"
                        + (f", {rendered.truncated} rows cut to max_seq_len={max_seq_len}" if rendered.truncated else ""))
    for column, context in handle.variants():
        with context:
            sums, counts = sequence_logps(handle.model, rendered.rows, pad_token_id=handle.tokenizer.pad_token_id,
                                          batch_size=batch_size, device=handle.device)  # fmt: skip
        loss = -sum(sums) / sum(counts)
        report.add(column, {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
                            "tokens": sum(counts)})  # fmt: skip


def pairwise(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float]:
    """Fraction of pairs with chosen > rejected, and the mean difference."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins)}


def preference_eval(handle, rows, path: str, report, *, max_seq_len: int = 1024, batch_size: int = 8,
                    beta: float = 0.1) -> None:
    """Pairwise accuracy and margin of the log-probs per variant; implicit reward metrics for an adapter."""
    from pmetal.data.preference import to_preference_pairs, tokenize_pairs
    from pmetal.data.render import ensure_chat_template

    pairs, skipped = to_preference_pairs(rows, path=path)
    ensure_chat_template(handle.tokenizer)
    items = tokenize_pairs(handle.tokenizer, pairs, max_seq_len)
    report.notes.append(f"{len(pairs)} pairs" + (f" ({len(skipped)} rows with chosen == rejected skipped)" if skipped else "")
                        + "; log-probs are summed over each completion's tokens")  # fmt: skip
    scores = {}
    for column, context in handle.variants():
        with context:
            scores[column] = [sequence_logps(handle.model, items, pad_token_id=handle.tokenizer.pad_token_id,
                                             batch_size=batch_size, device=handle.device, prefix=side)[0]
                              for side in ("chosen_", "rejected_")]  # fmt: skip
        chosen, rejected = scores[column]
        report.add(column, {f"logp_{k}": v for k, v in pairwise(chosen, rejected).items()}
                   | {"logp_chosen": sum(chosen) / len(chosen), "logp_rejected": sum(rejected) / len(rejected)})
    if handle.has_adapter:
        (base_c, base_r), (pol_c, pol_r) = scores["base"], scores["adapter"]
        reward_c = [beta * (p - b) for p, b in zip(pol_c, base_c)]
        reward_r = [beta * (p - b) for p, b in zip(pol_r, base_r)]
        report.add("adapter", {f"reward_{k}": v for k, v in pairwise(reward_c, reward_r).items()}
                   | {"reward_chosen": sum(reward_c) / len(reward_c), "reward_rejected": sum(reward_r) / len(reward_r)})
        report.notes.append(f"reward_*: implicit DPO reward beta*(log p_adapter - log p_base), beta={beta}")
