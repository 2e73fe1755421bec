"""KTO data: unpaired completions labelled desirable or undesirable.

**KTO.** A row holds `prompt` (or `instruction`/`input`), `completion` (or `response`/`output`)
and `label`: a bool, 0/1, or a word (`good`/`bad`, `true`/`false`, `yes`/`no`, `desirable`/
`undesirable`, `positive`/`negative`, `chosen`/`rejected`, `thumbs_up`/`thumbs_down`). The data
need not be paired: each row stands alone.

Rows are normalized, rendered and truncated as preference pairs are (`pmetal.data.preference`): the
loss mask covers the completion only, a too-long prompt keeps its tail, and bad rows raise
`DataError` naming the file, row and field.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pmetal.data.formats import row_error
from pmetal.data.preference import (
    COMPLETION_FIELDS,
    PreferenceCollator,
    PreferenceDataModule,
    TruncationStats,
    _completion,
    _first_field,
    _full_prompt,
    _missing,
    _raw_prompt,
    _render,
    _split_prompt,
)
from pmetal.tokens import IGNORE_INDEX

log = logging.getLogger("pmetal")

LABEL_WORDS = {
    True: ("true", "1", "good", "yes", "desirable", "positive", "chosen", "thumbs_up", "up", "+"),
    False: ("false", "0", "bad", "no", "undesirable", "negative", "rejected", "thumbs_down", "down", "-"),
}
_LABELS = {word: value for value, words in LABEL_WORDS.items() for word in words}
LABEL_HELP = "true/false, 1/0, or one of: " + ", ".join(w for words in LABEL_WORDS.values() for w in words[2:])


@dataclass
class KtoExample:
    """One normalized KTO row: prompt messages, a completion text, and whether it is desirable."""

    prompt: list[dict[str, str]] | str  # raw text under chat_template=False
    completion: str
    desirable: bool


# ----------------------------------------------------------------------------------------------
# Rows -> normalized examples
# ----------------------------------------------------------------------------------------------


def parse_label(rows: Sequence[dict], index: int, *, field: str = "label", path: str | None = None) -> bool:
    """A KTO label as a bool: True/False, 1/0 (also 1.0/0.0), or a word from `LABEL_WORDS`."""
    value = rows[index].get(field)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    got = "missing" if value is None else f"unknown label {value!r}"
    raise row_error(rows, index, got, field=field, expected=LABEL_HELP, path=path)


def to_kto_examples(rows: Sequence[dict], *, system_prompt: str | None = None, path: str | None = None,
                    raw: bool = False) -> list[KtoExample]:
    """Normalize KTO rows: prompt, completion (or response/output) and label.

    `raw`: keep plain-string prompts as text, for tokenizing without a chat template.

    Raises:
        DataError: a missing/empty prompt or completion, or a label that is not a bool, 0/1 or a
            known word; each names file, row and field.
    """
    examples = []
    for i, row in enumerate(rows):
        field = _first_field(row, COMPLETION_FIELDS)
        if field is None:
            raise _missing(rows, i, COMPLETION_FIELDS, path)
        context, completion = _completion(rows, i, field, path)
        prompt = _raw_prompt(rows, i, context, field, path) if raw else _full_prompt(rows, i, context, system_prompt, path)
        examples.append(KtoExample(prompt, completion, parse_label(rows, i, path=path)))
    return examples


def kto_balance_warning(num_desirable: int, num_undesirable: int, desirable_weight: float = 1.0,
                        undesirable_weight: float = 1.0) -> str | None:
    """A warning when the weighted desirable:undesirable ratio is far from 1:1, else None.

    Ethayarajh et al. (2024, §4.2) recommend weights with
    `desirable_weight * n_desirable / (undesirable_weight * n_undesirable)` in [1, 4/3]; pmetal
    warns only outside [1/2, 2] so that ordinary imbalance stays quiet.
    """
    if num_desirable == 0 or num_undesirable == 0:
        missing = "undesirable" if num_undesirable == 0 else "desirable"
        return f"KTO data has no {missing} examples; only one side of the loss will train"
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    if 0.5 <= ratio <= 2.0:
        return None
    if ratio > 2.0:
        advice = f"undesirable_weight={desirable_weight * num_desirable / num_undesirable:.2f}"
    else:
        advice = f"desirable_weight={undesirable_weight * num_undesirable / num_desirable:.2f}"
    return (f"KTO data is imbalanced: {num_desirable} desirable vs {num_undesirable} undesirable examples "
            f"(weighted ratio {ratio:.2f}); consider {advice} "
            f"(the KTO paper keeps desirable_weight*n_desirable / (undesirable_weight*n_undesirable) in [1, 4/3])")


def tokenize_kto(tokenizer, examples: Sequence[KtoExample], max_seq_len: int, *, first_index: int = 0, seed: int = 0,
                 stats: TruncationStats | None = None) -> list[dict[str, Any]]:
    """Render KTO rows, and give each a mismatched completion for the KL reference point.

    Departure from the paper (which mismatches within each microbatch) as in TRL: row i's KL
    sequence is its prompt followed by the completion of another row, fixed here by a seeded
    cyclic shift of a random order. A fixed pairing lets reference log-probs be precomputed; the
    estimate of KL(pi_theta || pi_ref) over mismatched pairs is the same in expectation.
    """
    stats = stats if stats is not None else TruncationStats()
    rendered = [_split_prompt(*_render(tokenizer, ex.prompt, ex.completion, max_seq_len, stats)) for ex in examples]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[k - 1] for k in range(len(order))}  # a single row is its own partner
    items = []
    for k, ((prompt_ids, completion_ids), ex) in enumerate(zip(rendered, examples)):
        kl_completion = rendered[partner[k]][1]
        kl_prompt = prompt_ids[max(0, len(prompt_ids) + len(kl_completion) - max_seq_len):]
        kl_completion = kl_completion[: max_seq_len - len(kl_prompt)]
        items.append({"index": first_index + k, "desirable": ex.desirable,
                      "input_ids": prompt_ids + completion_ids,
                      "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
                      "kl_input_ids": kl_prompt + kl_completion,
                      "kl_labels": [IGNORE_INDEX] * len(kl_prompt) + kl_completion})
    return items


class KtoCollator(PreferenceCollator):
    """KTO batch: `input_ids`/`attention_mask`/`labels` `[B, T]`, `desirable [B] bool`, `index [B]`, and the
    mismatched KL sequences `kl_input_ids`/`kl_attention_mask`/`kl_labels` padded to the same T."""

    sides = ("", "kl_")


class KtoDataModule(PreferenceDataModule):
    """Unpaired desirable/undesirable completions (KTO); the same arguments as PreferenceDataModule.

    After setup, `num_desirable` and `num_undesirable` count the training rows; the KTO module warns
    when their ratio is far from 1:1 while its weights are unchanged.
    """

    example_file = "kto.jsonl"
    collator = KtoCollator
    num_desirable: int = 0
    num_undesirable: int = 0

    def _examples(self, rows, path) -> list:
        return to_kto_examples(rows, system_prompt=self.system_prompt, path=path, raw=self.chat_template is False)

    def _tokenize(self, tokenizer, examples, first_index: int, stats: TruncationStats) -> list[dict]:
        return tokenize_kto(tokenizer, examples, self.max_seq_len, first_index=first_index, seed=self.seed,
                            stats=stats)

    def _on_examples(self, train: list, val: list) -> None:
        self.num_desirable = sum(ex.desirable for ex in train)
        self.num_undesirable = len(train) - self.num_desirable
        log.info("KTO data: %d desirable, %d undesirable training rows", self.num_desirable, self.num_undesirable)
