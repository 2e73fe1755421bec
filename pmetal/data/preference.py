"""Preference data: pairs (DPO, SimPO, ORPO) and unpaired labelled completions (KTO).

**Pairs.** A row holds a prompt, a chosen and a rejected completion:

| field     | accepted names                                                             |
|-----------|----------------------------------------------------------------------------|
| prompt    | `prompt` (string or message list), or `instruction` + optional `input` (+ `system`) |
| chosen    | `chosen`, `accepted`, `preferred`, `chosen_response`                        |
| rejected  | `rejected`, `dispreferred`, `rejected_response`                             |

Completions are strings or message lists (conversational, as in TRL): then the completion is the
list's last message, which must be an assistant turn, and any turns before it join the prompt.
Without a prompt field, conversational chosen/rejected lists carry the prompt themselves (the
"implicit prompt" of Anthropic-HH-style data): everything before the last assistant turn, which
must be the same in both.

**KTO.** A row holds `prompt` (or `instruction`/`input`), `completion` (or `response`/`output`)
and `label`: a bool, 0/1, or a word (`good`/`bad`, `true`/`false`, `yes`/`no`, `desirable`/
`undesirable`, `positive`/`negative`, `chosen`/`rejected`, `thumbs_up`/`thumbs_down`). The data
need not be paired: each row stands alone.

**Bad rows.** A missing or empty field, a message list that does not end in an assistant turn, or
an unknown label raises `DataError` naming the file, row and field. A pair whose chosen and
rejected completions are identical carries no preference: it is skipped and counted (one warning
with the first few row numbers), never trained on.

**Rendering.** The chat template renders the prompt (with the generation prompt); the loss mask
covers the completion tokens only (end-of-turn included). When prompt + completion exceed
`max_seq_len`, the prompt keeps its tail (the turns nearest the answer); the cut tokens are counted
and reported once per split.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch

from pmetal.data.formats import coerce_messages, load_rows, locate, require_string, row_error
from pmetal.errors import DataError

log = logging.getLogger("pmetal")

CHOSEN_FIELDS = ("chosen", "accepted", "preferred", "chosen_response")
REJECTED_FIELDS = ("rejected", "dispreferred", "rejected_response")
COMPLETION_FIELDS = ("completion", "response", "output")
LABEL_WORDS = {
    True: ("true", "1", "good", "yes", "desirable", "positive", "chosen", "thumbs_up", "up", "+"),
    False: ("false", "0", "bad", "no", "undesirable", "negative", "rejected", "thumbs_down", "down", "-"),
}
_LABELS = {word: value for value, words in LABEL_WORDS.items() for word in words}
LABEL_HELP = "true/false, 1/0, or one of: " + ", ".join(w for words in LABEL_WORDS.values() for w in words[2:])
IGNORE_INDEX = -100


@dataclass
class PreferencePair:
    """One normalized preference pair: prompt messages and the two completion texts."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


@dataclass
class KtoExample:
    """One normalized KTO row: prompt messages, a completion text, and whether it is desirable."""

    prompt: list[dict[str, str]]
    completion: str
    desirable: bool


# ----------------------------------------------------------------------------------------------
# Rows -> normalized examples
# ----------------------------------------------------------------------------------------------

def _first_field(row: dict, names: Sequence[str]) -> str | None:
    return next((n for n in names if row.get(n) is not None), None)


def _prompt_messages(rows, i, path) -> list[dict[str, str]] | None:
    """The row's explicit prompt as messages, or None when the row has no prompt field."""
    row = rows[i]
    if row.get("prompt") is not None:
        if isinstance(row["prompt"], list):
            messages = coerce_messages(rows, i, "prompt", path=path)
        else:
            messages = [{"role": "user", "content": require_string(rows, i, "prompt", path=path)}]
    elif row.get("instruction") is not None:
        text = require_string(rows, i, "instruction", path=path)
        extra = require_string(rows, i, "input", allow_empty=True, path=path) if row.get("input") is not None else ""
        messages = [{"role": "user", "content": f"{text}\n\n{extra}" if extra.strip() else text}]
        if row.get("system") is not None:
            messages.insert(0, {"role": "system", "content": require_string(rows, i, "system", path=path)})
    else:
        return None
    return messages


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _completion(rows, i, field: str, path) -> tuple[list[dict[str, str]], str]:
    """(turns before the completion, completion text) of a string or message-list completion."""
    value = rows[i][field]
    if isinstance(value, list):
        messages = coerce_messages(rows, i, field, path=path)
        last = messages[-1]
        if last["role"] != "assistant":
            raise row_error(rows, i, f"the last message is a {last['role']} turn, not the completion", field=field,
                            expected="a message list ending in an assistant turn (or a plain string)", path=path)
        context, text = messages[:-1], last["content"]
    else:
        context, text = [], require_string(rows, i, field, allow_empty=True, path=path)
    if not text.strip():
        raise row_error(rows, i, "completion is empty", field=field, expected="a non-empty completion", path=path)
    return context, text


def _missing(rows, i, names: Sequence[str], path) -> DataError:
    columns = ", ".join(sorted(map(str, rows[i]))) or "(none)"
    return row_error(rows, i, f"no {names[0]} field (columns: {columns})", field=names[0],
                     expected="one of " + ", ".join(names), path=path)


def to_preference_pairs(rows: Sequence[dict], *, system_prompt: str | None = None,
                        path: str | None = None) -> tuple[list[PreferencePair], list[int]]:
    """Normalize preference rows (see the module docstring for the accepted fields).

    Args:
        rows: rows from `load_rows` (or plain dicts; then pass `path` for error messages).
        system_prompt: prepended as a system message to prompts that have none.
        path: file name for errors when `rows` is a plain list.

    Returns:
        (pairs, skipped): the pairs in file order, and the 1-based row numbers of rows skipped
        because chosen and rejected were identical.

    Raises:
        DataError: a missing/empty prompt or completion, a conversational completion that does not
            end in an assistant turn, or chosen/rejected conversations that disagree before it.
    """
    pairs, skipped = [], []
    for i, row in enumerate(rows):
        chosen_field, rejected_field = _first_field(row, CHOSEN_FIELDS), _first_field(row, REJECTED_FIELDS)
        if chosen_field is None:
            raise _missing(rows, i, CHOSEN_FIELDS, path)
        if rejected_field is None:
            raise _missing(rows, i, REJECTED_FIELDS, path)
        prompt = _prompt_messages(rows, i, path)
        chosen_context, chosen = _completion(rows, i, chosen_field, path)
        rejected_context, rejected = _completion(rows, i, rejected_field, path)
        if chosen_context != rejected_context:
            raise row_error(rows, i, f"'{chosen_field}' and '{rejected_field}' differ before their last message",
                            field=rejected_field, path=path,
                            expected="the same conversation in both, differing only in the final assistant turn")
        if prompt is None and not chosen_context:
            raise _missing(rows, i, ("prompt", "instruction"), path)
        prompt = _with_system((prompt or []) + chosen_context, system_prompt)
        if chosen.strip() == rejected.strip():
            skipped.append(locate(rows, i, path)[1])
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected))
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d of %d rows whose chosen and rejected completions are identical (rows %s)",
                    path or locate(rows, 0)[0] or "data", len(skipped), len(rows), shown)
    if not pairs:
        raise DataError(path or locate(rows, 0)[0], "no usable preference pairs",
                        expected="rows whose chosen and rejected completions differ")
    return pairs, skipped


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


def to_kto_examples(rows: Sequence[dict], *, system_prompt: str | None = None,
                    path: str | None = None) -> list[KtoExample]:
    """Normalize KTO rows: prompt, completion (or response/output) and label.

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
        prompt = _prompt_messages(rows, i, path)
        if prompt is None and not context:
            raise _missing(rows, i, ("prompt", "instruction"), path)
        prompt = _with_system((prompt or []) + context, system_prompt)
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
