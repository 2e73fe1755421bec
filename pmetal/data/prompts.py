"""Prompt datasets for online RL (GRPO, DAPO, RLKD): a prompt per row, plus columns for the rewards.

| layout            | prompt                                              | passed to rewards            |
|-------------------|-----------------------------------------------------|------------------------------|
| `prompt`          | `prompt` (a string or a message list)               | every other column           |
| `prompt_column`   | the named column                                    | every other column           |
| question/answer   | `question` (GSM8K)                                  | `answer`, ...                |
| problem/solution  | `problem` (MATH; the reasoning format's `thinking` is dropped) | `solution`, ...   |
| alpaca            | `instruction` + optional `input` (+ `system`)       | `output` as `solution`       |
| messages/sharegpt | the turns before the last assistant turn            | that assistant turn as `solution` |

The reference answer never enters the prompt: it only reaches the reward functions (as the
`answer`/`solution` column). A row without a usable prompt raises `DataError` naming file, row
and field. Prompts are rendered with the chat template (generation prompt included) and
tokenized once; a prompt longer than `max_prompt_length` keeps its tail and is counted.

A batch is a dict: `prompt_ids` (token-id lists), `prompts` (as the dataset gave them),
`columns` (`{name: [value per prompt]}`) and `index` (row numbers); `RolloutCallback` turns it
into completions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any, Optional

from pmetal.data.base import PmetalDataModule, check_val_fraction, held_out_split
from pmetal.data.formats import coerce_messages, load_rows, require_string, row_error
from pmetal.errors import DataError

log = logging.getLogger("pmetal")

PROMPT_LAYOUTS = "a 'prompt' column (string or messages), 'question', 'problem', 'instruction', or 'messages'/'conversations'"


def _conversation_prompt(rows, i, field: str, path) -> tuple[list[dict], dict[str, Any]]:
    messages = coerce_messages(rows, i, field, path=path)
    last_assistant = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    extra = {}
    if last_assistant is not None:
        extra["solution"] = messages[last_assistant]["content"]
        messages = messages[:last_assistant]
    if not any(m["role"] == "user" for m in messages):
        raise row_error(rows, i, "no user message before the last assistant turn", field=field,
                        expected="a conversation with a user prompt", path=path)
    return messages, extra


def row_to_prompt(rows: Sequence[dict], i: int, *, prompt_column: str | None = None,
                  path: str | None = None) -> tuple[Any, list[dict], dict[str, Any]]:
    """(prompt as given, prompt messages, columns for the rewards) of row `i`."""
    row = rows[i]
    consumed: set[str]
    extra: dict[str, Any] = {}
    column = prompt_column or next((c for c in ("prompt", "question", "problem") if row.get(c) is not None), None)
    if column is not None:
        value = row.get(column)
        if isinstance(value, list):
            messages, extra = _conversation_prompt(rows, i, column, path)
            original: Any = messages
        else:
            original = require_string(rows, i, column, path=path)
            messages = [{"role": "user", "content": original}]
        consumed = {column, "thinking"}  # the reasoning format's worked thinking is a solution: never shown
    elif row.get("instruction") is not None:
        text = require_string(rows, i, "instruction", path=path)
        more = require_string(rows, i, "input", allow_empty=True, path=path) if row.get("input") is not None else ""
        original = f"{text}\n\n{more}" if more.strip() else text
        messages = [{"role": "user", "content": original}]
        if row.get("system") is not None:
            messages.insert(0, {"role": "system", "content": require_string(rows, i, "system", path=path)})
        consumed = {"instruction", "input", "system", "output"}
        if row.get("output") is not None:
            extra["solution"] = row["output"]
    elif row.get("messages") is not None or row.get("conversations") is not None:
        field = "messages" if row.get("messages") is not None else "conversations"
        messages, extra = _conversation_prompt(rows, i, field, path)
        original, consumed = messages, {field}
    else:
        found = ", ".join(sorted(map(str, row))) or "(none)"
        raise row_error(rows, i, f"no prompt in this row (columns: {found})", expected=PROMPT_LAYOUTS, path=path)
    columns = {k: v for k, v in row.items() if k not in consumed}
    for key, value in extra.items():
        columns.setdefault(key, value)
    return original, messages, columns


def collate_prompts(items: Sequence[dict]) -> dict[str, Any]:
    """Prompt items -> one batch dict (lists, no tensors: the rollout makes the tensors)."""
    names = sorted({k for item in items for k in item["columns"]})
    return {
        "prompt_ids": [item["prompt_ids"] for item in items],
        "prompts": [item["prompt"] for item in items],
        "columns": {name: [item["columns"].get(name) for item in items] for name in names},
        "index": [item["index"] for item in items],
    }


class VlmPromptCollator:
    """`collate_prompts` plus `pixel_inputs`: one dict of image tensors per prompt (empty without images)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[dict]) -> dict:
        from pmetal.data.vlm import pixel_inputs_of

        batch = collate_prompts(items)
        batch["pixel_inputs"] = [pixel_inputs_of(self.processor, item.get("images") or [], item.get("root"))
                                 for item in items]
        return batch


def vlm_row_to_prompt(rows: Sequence[dict], index: int, *, prompt_column: str | None = None,
                      path: str | None = None) -> tuple[Any, list, dict[str, Any]]:
    """`row_to_prompt` for image rows: message prompts keep their image parts.

    Every column but the prompt's (images included) goes to the reward functions.
    """
    row = rows[index]
    column = prompt_column or next((c for c in ("prompt", "question", "problem", "messages", "conversations")
                                    if row.get(c) is not None), None)
    if column is None or not isinstance(row.get(column), list):
        return row_to_prompt(rows, index, prompt_column=prompt_column, path=path)
    messages = list(row[column])
    columns = {k: v for k, v in row.items() if k != column}
    last = max((k for k, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), default=None)
    if last is not None:
        answer = messages[last].get("content")
        columns.setdefault("solution", answer if isinstance(answer, str)
                           else "".join(p.get("text", "") for p in answer if isinstance(p, dict)))
        messages = messages[:last]
    return messages, messages, columns


class PromptDataModule(PmetalDataModule):
    """Prompts (plus answer columns for the rewards) for GRPO, DAPO and RLKD.

    Args:
        path: training prompts: a .jsonl/.json/.parquet/.csv file, a directory of them, or a hub dataset
            id. None uses pmetal's small shipped arithmetic example (examples/data/grpo.jsonl).
        batch_size: prompts per training step; each gets `num_generations` completions.
        max_prompt_length: most prompt tokens; a longer prompt keeps its tail (counted and reported).
        prompt_column: the column holding the prompt, when it is not `prompt`/`question`/`problem`/...
        system_prompt: a system message added to prompts that have none.
        chat_template: None keeps the model's template; "chatml", a Jinja string or a .jinja file replaces it.
        seed: seed of the shuffling (and of the extra prompts drawn by DAPO's dynamic sampling).
        tokenizer: a tokenizer; None takes the training module's (`trainer.lightning_module.tokenizer`).
        num_workers: DataLoader worker processes.
        processor: a vision-language model's processor: prompts then carry images (`image`/`images`
            columns or image parts); None takes the training module's `processor` when it has one.
        eval_path: held-out prompts in the same layout, sampled every `--eval-every` steps
            (eval/reward, eval/accuracy, eval/pass@k); None holds out `val_fraction` of `path`.
        val_fraction: fraction of the prompts held out for evaluation when there is no `eval_path`
            (at least one prompt when positive); 0 = no held-out evaluation.
    """

    def __init__(self, path: Optional[str] = None, batch_size: int = 4, max_prompt_length: int = 512,
                 prompt_column: Optional[str] = None, system_prompt: Optional[str] = None,
                 chat_template: Optional[str] = None, seed: int = 42, tokenizer: Optional[Any] = None,
                 num_workers: int = 0, processor: Optional[Any] = None, eval_path: Optional[str] = None,
                 val_fraction: float = 0.0) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(None, f"batch_size={batch_size}", expected="at least 1 prompt per step")
        check_val_fraction(val_fraction)
        self.eval_path, self.val_fraction = eval_path, val_fraction
        self.val_items: list[dict] = []
        if path is None:
            from pmetal.data.formats import example_path

            path = str(example_path("grpo.jsonl"))
        self.path, self.batch_size, self.max_prompt_length = path, batch_size, max_prompt_length
        self.prompt_column, self.system_prompt, self.chat_template = prompt_column, system_prompt, chat_template
        self.seed, self.tokenizer, self.num_workers, self.processor = seed, tokenizer, num_workers, processor
        self.train_items: list[dict] | None = None
        self._rng: random.Random | None = None
        self._collate = collate_prompts

    def prepare(self) -> None:
        from pmetal.data.vlm import vlm_processor

        processor = vlm_processor(self)  # a VLM: prompts carry their images (pmetal.data.vlm)
        self._collate = VlmPromptCollator(processor) if processor is not None else collate_prompts
        items = self._items(self.path, processor)
        if self.eval_path:
            self.val_items = self._items(self.eval_path, processor)
        else:
            items, self.val_items = held_out_split(items, self.val_fraction, self.seed, path=self.path)
        self.train_items = items
        log.info("prompt data: %d prompts from %s%s", len(items), self.path,
                 f", {len(self.val_items)} held out" if self.val_items else "")

    def _items(self, path: str, processor) -> list[dict]:
        from pmetal.data.render import render_prompt
        from pmetal.data.vlm import vlm_prompt_item

        tokenizer = self.chat_tokenizer()
        rows = load_rows(path)
        if not rows:
            raise DataError(path, "no rows", expected="at least one prompt")
        items, truncated = [], 0
        for i in range(len(rows)):
            original, messages, columns = (vlm_row_to_prompt if processor else row_to_prompt)(
                rows, i, prompt_column=self.prompt_column, path=path)
            if self.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            if processor is not None:
                item, cut = vlm_prompt_item(processor, rows, i, messages, path=path,
                                            max_prompt_length=self.max_prompt_length)
                truncated += cut
                items.append({**item, "prompt": original, "columns": columns, "index": i})
                continue
            ids = render_prompt(tokenizer, messages)
            if len(ids) > self.max_prompt_length:
                ids, truncated = ids[-self.max_prompt_length :], truncated + 1
            items.append({"prompt_ids": ids, "prompt": original, "columns": columns, "index": i})
        if truncated:
            log.warning("%s: %d of %d prompts were longer than max_prompt_length=%d and keep only their last tokens",
                        path, truncated, len(items), self.max_prompt_length)
        return items

    def train_dataloader(self):
        self.setup("fit")
        return self.resumable_loader(self.train_items, self._collate, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        self.setup("fit")
        if not self.val_items:
            return []
        return self.resumable_loader(self.val_items, self._collate, batch_size=self.batch_size, shuffle=False)

    def _draws(self) -> random.Random:
        if self._rng is None:  # per rank: each process draws its own extra prompts
            rank = self.replica()[0]
            self._rng = random.Random(self.seed + 1 + 1_000_003 * rank)
        return self._rng

    def sample(self, n: int) -> dict[str, Any]:
        """A batch of `n` prompts drawn at random (DAPO's dynamic sampling asks for more prompts).

        Every prompt of a draw is rendered here with its whole group: groups never span ranks.
        """
        if not self.train_items:
            raise DataError(self.path, "no prompts loaded (setup() has not run)", expected="setup() first")
        rng = self._draws()
        return self._collate([rng.choice(self.train_items) for _ in range(n)])

    def random_state(self) -> dict[str, Any]:
        return {"draws": self._draws().getstate()}

    def load_random_state(self, state: dict[str, Any]) -> None:
        if "draws" in state:
            version, internal, gauss = state["draws"]
            self._draws().setstate((int(version), tuple(int(x) for x in internal), gauss))
