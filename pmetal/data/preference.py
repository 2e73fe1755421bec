"""Preference pairs (DPO, SimPO, ORPO); the unpaired KTO rows build on this in `pmetal.data.kto`.

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

**Margin.** An optional numeric `margin` column (how strongly chosen beats rejected; Llama 2's
reward-model margin, read by `pmetal fit --method reward`) travels with each pair as `margin`.
When one row has it every row of that file must, as a finite number.

**Bad rows.** A missing or empty field, a message list that does not end in an assistant turn, or
an unknown KTO label raises `DataError` naming the file, row and field. A pair whose chosen and
rejected completions are identical carries no preference: it is skipped and counted (one warning
with the first few row numbers), never trained on.

**Rendering.** The chat template renders the prompt (with the generation prompt); the loss mask
covers the completion tokens only (end-of-turn included). A plain-string prompt becomes a user turn
and a plain-string completion the assistant turn. With `chat_template=False` plain-string rows are
tokenized as raw text instead, as TRL does (`prompt + completion + EOS`; see
`pmetal.data.render.render_raw_prompt_completion`): for base models and for runs compared with TRL. When prompt + completion exceed
`max_seq_len`, the prompt keeps its tail (the turns nearest the answer); the cut tokens are counted
and reported once per split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from pmetal.data.base import PmetalDataModule, check_val_fraction, held_out_split
from pmetal.data.formats import coerce_messages, load_rows, locate, require_string, row_error
from pmetal.data.render import (
    datamodule_tokenizer,
    ensure_chat_template,
    render_prompt_completion,
    render_raw_prompt_completion,
)
from pmetal.errors import DataError
from pmetal.tokens import IGNORE_INDEX

log = logging.getLogger("pmetal")

CHOSEN_FIELDS = ("chosen", "accepted", "preferred", "chosen_response")
REJECTED_FIELDS = ("rejected", "dispreferred", "rejected_response")
COMPLETION_FIELDS = ("completion", "response", "output")


@dataclass
class PreferencePair:
    """One normalized preference pair: prompt messages (raw text under chat_template=False) and the two completions."""

    prompt: list[dict[str, str]] | str
    chosen: str
    rejected: str
    margin: float | None = None


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


def _full_prompt(rows, i, context: list[dict[str, str]], system_prompt: str | None, path) -> list[dict[str, str]]:
    """The explicit prompt (if any) + the turns before the completion, with the default system prompt."""
    prompt = _prompt_messages(rows, i, path)
    if prompt is None and not context:
        raise _missing(rows, i, ("prompt", "instruction"), path)
    messages = (prompt or []) + context
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _raw_prompt(rows, i, context: list[dict[str, str]], completion_field: str, path) -> str:
    """The plain-text prompt of a row that is tokenized without a chat template (chat_template=False)."""
    if context or isinstance(rows[i].get("prompt"), list):
        field = "prompt" if isinstance(rows[i].get("prompt"), list) else completion_field
        raise row_error(rows, i, "a conversation cannot be tokenized without a chat template", field=field,
                        expected="plain-string prompt and completions (or keep chat_template on)", path=path)
    if rows[i].get("prompt") is None:
        raise _missing(rows, i, ("prompt",), path)
    return require_string(rows, i, "prompt", path=path)


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


def _margin(rows, i, path, required: bool) -> float | None:
    """The row's `margin` as a float (None when the file has no margin column)."""
    value = rows[i].get("margin")
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        found = "missing" if value is None else f"{value!r} is not a finite number"
        raise row_error(rows, i, f"margin {found}", field="margin", path=path,
                        expected="a finite number in every row once one row has a margin")
    return float(value)


def _missing(rows, i, names: Sequence[str], path) -> DataError:
    columns = ", ".join(sorted(map(str, rows[i]))) or "(none)"
    return row_error(rows, i, f"no {names[0]} field (columns: {columns})", field=names[0],
                     expected="one of " + ", ".join(names), path=path)


def to_preference_pairs(rows: Sequence[dict], *, system_prompt: str | None = None, path: str | None = None,
                        raw: bool = False) -> tuple[list[PreferencePair], list[int]]:
    """Normalize preference rows (fields: see the module docstring); `path` names plain lists in errors.

    `raw`: keep plain-string prompts as text, for tokenizing without a chat template.

    Returns:
        (pairs, skipped): the pairs in file order, and the 1-based row numbers of rows skipped
        because chosen and rejected were identical.

    Raises:
        DataError: a missing/empty prompt or completion, a conversational completion that does not
            end in an assistant turn, or chosen/rejected conversations that disagree before it.
    """
    pairs, skipped = [], []
    has_margin = any(row.get("margin") is not None for row in rows)
    for i, row in enumerate(rows):
        chosen_field, rejected_field = _first_field(row, CHOSEN_FIELDS), _first_field(row, REJECTED_FIELDS)
        if chosen_field is None:
            raise _missing(rows, i, CHOSEN_FIELDS, path)
        if rejected_field is None:
            raise _missing(rows, i, REJECTED_FIELDS, path)
        chosen_context, chosen = _completion(rows, i, chosen_field, path)
        rejected_context, rejected = _completion(rows, i, rejected_field, path)
        if chosen_context != rejected_context:
            raise row_error(rows, i, f"'{chosen_field}' and '{rejected_field}' differ before their last message",
                            field=rejected_field, path=path,
                            expected="the same conversation in both, differing only in the final assistant turn")
        if raw:
            prompt = _raw_prompt(rows, i, chosen_context, chosen_field, path)
        else:
            prompt = _full_prompt(rows, i, chosen_context, system_prompt, path)
        if chosen.strip() == rejected.strip():
            skipped.append(locate(rows, i, path)[1])
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, _margin(rows, i, path, has_margin)))
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        log.warning("%s: skipped %d of %d rows whose chosen and rejected completions are identical (rows %s)",
                    path or locate(rows, 0)[0] or "data", len(skipped), len(rows), shown)
    if not pairs:
        raise DataError(path or locate(rows, 0)[0], "no usable preference pairs",
                        expected="rows whose chosen and rejected completions differ")
    return pairs, skipped


# ----------------------------------------------------------------------------------------------
# Tokenizing and collating
# ----------------------------------------------------------------------------------------------

@dataclass
class TruncationStats:
    """How many rendered sequences were longer than max_seq_len, and how many tokens were cut."""

    sequences: int = 0
    truncated: int = 0
    tokens_cut: int = 0

    def report(self, what: str, max_seq_len: int) -> None:
        if self.truncated:
            log.warning("%s: %d of %d sequences exceeded max_seq_len=%d; cut %d tokens (prompt heads first)",
                        what, self.truncated, self.sequences, max_seq_len, self.tokens_cut)


def _render(tokenizer, prompt, completion: str, max_seq_len: int, stats: TruncationStats) -> tuple[list, list]:
    render = render_raw_prompt_completion if isinstance(prompt, str) else render_prompt_completion
    ids, labels, truncated = render(tokenizer, prompt, completion, max_seq_len, keep="prompt_tail")
    stats.sequences += 1
    if truncated:
        full, _, _ = render(tokenizer, prompt, completion, None)
        stats.truncated += 1
        stats.tokens_cut += len(full) - len(ids)
    return ids, labels


def tokenize_pairs(tokenizer, pairs: Sequence[PreferencePair], max_seq_len: int, *, first_index: int = 0,
                   stats: TruncationStats | None = None) -> list[dict[str, Any]]:
    """Render each pair into `chosen_*`/`rejected_*` ids and labels (loss on the completion only).

    `index` numbers the pairs from `first_index`, so cached reference log-probs can be found again.
    """
    stats = stats if stats is not None else TruncationStats()
    items = []
    for k, pair in enumerate(pairs):
        chosen_ids, chosen_labels = _render(tokenizer, pair.prompt, pair.chosen, max_seq_len, stats)
        rejected_ids, rejected_labels = _render(tokenizer, pair.prompt, pair.rejected, max_seq_len, stats)
        items.append({"index": first_index + k, "chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                      "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels})
        if pair.margin is not None:
            items[-1]["margin"] = pair.margin
    return items


def _split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    start = next((t for t, x in enumerate(labels) if x != IGNORE_INDEX), len(ids))
    return ids[:start], ids[start:]


def _pad(rows: Sequence[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def _pad_group(items: Sequence[dict], prefixes: Sequence[str], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `<prefix>input_ids`/`<prefix>labels` of every prefix to one common length."""
    length = max(len(item[f"{p}input_ids"]) for item in items for p in prefixes)
    batch = {}
    for p in prefixes:
        ids = [item[f"{p}input_ids"] for item in items]
        batch[f"{p}input_ids"] = _pad(ids, pad_token_id, length)
        batch[f"{p}attention_mask"] = _pad([[1] * len(r) for r in ids], 0, length)
        batch[f"{p}labels"] = _pad([item[f"{p}labels"] for item in items], IGNORE_INDEX, length)
    return batch


class PreferenceCollator:
    """Pads chosen and rejected sides to ONE common length, so the module can concatenate them into a
    single `[2B, T]` forward: `chosen_{input_ids,attention_mask,labels}`, `rejected_*`, and `index [B]`."""

    sides: tuple[str, ...] = ("chosen_", "rejected_")

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = _pad_group(items, self.sides, self.pad_token_id)
        for key in (k for k in items[0] if not k.endswith(("input_ids", "labels"))):  # index, desirable, margin
            batch[key] = torch.tensor([item[key] for item in items])
        return batch


# ----------------------------------------------------------------------------------------------
# DataModules
# ----------------------------------------------------------------------------------------------

class PreferenceDataModule(PmetalDataModule):
    """Preference pairs (DPO, SimPO, ORPO) read from a file; see `pmetal.data.preference` for the fields.

    Args:
        path: training data: a .jsonl/.json/.parquet/.csv file, a directory of them, or a hub dataset id;
            None uses pmetal's small example set (examples/data/dpo.jsonl, KTO: kto.jsonl).
        eval_path: validation data in the same format; None holds out `val_fraction` of `path` instead.
        val_fraction: fraction of the training rows held out for validation when eval_path is None (0: none).
        batch_size: examples per batch (pairs for DPO/SimPO/ORPO, rows for KTO).
        max_seq_len: most tokens of prompt + completion; longer prompts lose their start first.
        seed: seed of the validation split, the shuffling and KTO's mismatched pairs.
        tokenizer: a tokenizer; None takes the training module's (`trainer.lightning_module.tokenizer`).
        system_prompt: a system message added to prompts that have none.
        chat_template: None (or true) keeps the model's template; "chatml", a Jinja string or a .jinja
            file replaces it; false tokenizes plain-string rows as raw text, without a template (as TRL
            does; for base models).
        num_workers: DataLoader worker processes.
    """

    example_file = "dpo.jsonl"
    collator = PreferenceCollator

    def __init__(self, path: Optional[str] = None, eval_path: Optional[str] = None, val_fraction: float = 0.0,
                 batch_size: int = 4, max_seq_len: int = 1024, seed: int = 0, tokenizer: Optional[Any] = None,
                 system_prompt: Optional[str] = None, chat_template: Union[bool, str, None] = None,
                 num_workers: int = 0) -> None:
        super().__init__()
        if chat_template is False and system_prompt:
            raise DataError(None, "system_prompt needs a chat template; chat_template=false tokenizes raw text",
                            expected="system_prompt unset, or chat_template left on")
        check_val_fraction(val_fraction)
        if path is None:
            from importlib.resources import files

            path = str(files("pmetal.examples") / "data" / self.example_file)
        self.path, self.eval_path, self.val_fraction = path, eval_path, val_fraction
        self.batch_size, self.max_seq_len, self.seed = batch_size, max_seq_len, seed
        self.tokenizer, self.system_prompt, self.chat_template = tokenizer, system_prompt, chat_template
        self.num_workers = num_workers
        self.train_items: list[dict] | None = None
        self.val_items: list[dict] = []

    # What differs between pairs and KTO rows.
    def _examples(self, rows, path) -> list:
        return to_preference_pairs(rows, system_prompt=self.system_prompt, path=path, raw=self.chat_template is False)[0]

    def _tokenize(self, tokenizer, examples, first_index: int, stats: TruncationStats) -> list[dict]:
        return tokenize_pairs(tokenizer, examples, self.max_seq_len, first_index=first_index, stats=stats)

    def prepare(self) -> None:
        self.tokenizer = tokenizer = datamodule_tokenizer(self)
        if self.chat_template is not False:
            ensure_chat_template(tokenizer, None if self.chat_template is True else self.chat_template)
        train = self._examples(load_rows(self.path), self.path)
        if self.eval_path:
            val = self._examples(load_rows(self.eval_path), self.eval_path)
        else:
            train, val = held_out_split(train, self.val_fraction, self.seed, path=self.path)
        self._on_examples(train, val)
        stats = TruncationStats(), TruncationStats()
        self.train_items = self._tokenize(tokenizer, train, 0, stats[0])
        self.val_items = self._tokenize(tokenizer, val, len(train), stats[1])
        stats[0].report(f"{self.path} (train)", self.max_seq_len)
        stats[1].report(f"{self.eval_path or self.path} (validation)", self.max_seq_len)
        log.info("preference data: %d training and %d validation examples", len(train), len(val))

    def _on_examples(self, train: list, val: list) -> None:
        """A hook for per-split statistics (KTO's desirable/undesirable counts)."""

    def _loader(self, items: list[dict], shuffle: bool):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return self.resumable_loader(items, self.collator(pad), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self):
        self.setup("fit")
        return self._loader(self.train_items, shuffle=True)

    def val_dataloader(self):
        self.setup("fit")
        return self._loader(self.val_items, shuffle=False) if self.val_items else []

    def ordered_dataloaders(self) -> list:
        """Every split in file order without shuffling: for precomputing reference log-probs by `index`."""
        return [self._loader(items, shuffle=False) for items in (self.train_items, self.val_items) if items]
