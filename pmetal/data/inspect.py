"""What pmetal sees in an SFT file: format, row counts, token lengths, and the loss mask.

Used by `pmetal dataset validate|preview`. Rows are rendered without truncation so the length
statistics show the real rows; the effect of `max_seq_len` is then counted (rows cut, rows left
with no token to learn from).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pmetal.data.formats import Rows, load_rows, locate, to_sft_examples
from pmetal.data.render import RenderedDataset, ensure_chat_template, render_sft_dataset
from pmetal.tokens import IGNORE_INDEX

FORMAT_NAMES = {
    "messages": "OpenAI messages [{role, content}]",
    "sharegpt": "ShareGPT conversations [{from, value}]",
    "reasoning": "reasoning problem/thinking/solution",
    "alpaca": "Alpaca instruction/input/output",
    "prompt_completion": "prompt/completion",
    "text": "plain text (no chat template, loss on every token)",
    "columns": "custom prompt/response columns",
}
TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


@dataclass
class LengthStats:
    """Token-length summary of a list of rows."""

    min: int
    mean: float
    p95: int
    max: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        if not lengths:
            return cls(0, 0.0, 0, 0)
        ordered = sorted(lengths)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]  # nearest-rank percentile
        return cls(ordered[0], sum(ordered) / len(ordered), p95, ordered[-1])

    def __str__(self) -> str:
        return f"min {self.min}  mean {self.mean:.1f}  p95 {self.p95}  max {self.max}"


@dataclass
class SftFileReport:
    """An SFT file as pmetal would train on it (rows rendered without truncation)."""

    path: str
    format: str
    rows: Rows
    rendered: RenderedDataset
    max_seq_len: int

    @property
    def lengths(self) -> list[int]:
        return self.rendered.lengths()

    @property
    def truncated(self) -> int:
        return sum(1 for n in self.lengths if n > self.max_seq_len)

    @property
    def unusable(self) -> int:
        """Rows with no loss token within `max_seq_len` (plus rows with none at all)."""
        cut = sum(1 for r in self.rendered.rows if all(x == IGNORE_INDEX for x in r["labels"][: self.max_seq_len]))
        return cut + len(self.rendered.dropped)

    def summary_lines(self) -> list[str]:
        n = len(self.rows)
        total = sum(min(x, self.max_seq_len) for x in self.lengths)
        trained = sum(1 for r in self.rendered.rows for x in r["labels"][: self.max_seq_len] if x != IGNORE_INDEX)
        share = f" ({100 * trained / total:.1f}%)" if total else ""
        return [
            f"file:        {self.path}",
            f"format:      {self.format} ({FORMAT_NAMES.get(self.format, self.format)})",
            f"rows:        {n} ({n - self.unusable} usable, {self.unusable} without a token to learn from "
            f"within max_seq_len)",
            f"tokens/row:  {LengthStats.of(self.lengths)}",
            f"loss tokens: {trained} of {total}{share} after truncation",
            f"truncated:   {self.truncated} rows longer than max_seq_len={self.max_seq_len}",
            f"assistant-first: {len(self.rendered.assistant_first)} rows open with an assistant message "
            "(no prompt: that turn is not trained)",
        ]

    def example(self, k: int, tokenizer: Any, color: bool = False) -> str:
        """The k-th usable row, rendered, with the loss mask shown and its file location."""
        row = self.rendered.rows[k]
        _, number, lines = locate(self.rows, self.rendered.source[k], self.path)
        ids, labels = row["input_ids"][: self.max_seq_len], row["labels"][: self.max_seq_len]
        trained = sum(1 for x in labels if x != IGNORE_INDEX)
        where = f"{'line' if lines else 'row'} {number}"
        legend = "loss on green text" if color else f"loss on the text inside {TRAINED_OPEN} {TRAINED_CLOSE}"
        cut = f", truncated from {len(row['input_ids'])}" if len(row["input_ids"]) > self.max_seq_len else ""
        head = f"--- {where}: {len(ids)} tokens{cut}, {trained} with loss ({legend})"
        return head + "\n" + show_mask(tokenizer, ids, labels, color=color)


def show_mask(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], *, color: bool = False) -> str:
    """Decode a row, marking the tokens that carry a loss.

    Trained runs are wrapped in `[[ ]]` (or shown green, masked text dim, with `color=True`).
    """
    out, run, run_trained = [], [], None
    for token, label in list(zip(input_ids, labels)) + [(None, None)]:
        trained = label is not None and label != IGNORE_INDEX
        if run and (token is None or trained != run_trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            if color:
                out.append(f"{GREEN if run_trained else DIM}{text}{RESET}")
            else:
                out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if run_trained else text)
            run = []
        if token is not None:
            run.append(token)
            run_trained = trained
    return "".join(out)


def inspect_sft_file(path: str, tokenizer: Any, *, max_seq_len: int = 1024, prompt_column: str | None = None,
                     response_column: str | None = None, system_prompt: str | None = None,
                     chat_template: str | None = None, train_on_prompt: bool = False) -> SftFileReport:
    """Load, validate and render an SFT file the way `SftDataModule` does (without truncating).

    Raises:
        DataError / PmetalError: the first problem found, naming file, row and field.
    """
    rows = load_rows(path)
    fmt, examples = to_sft_examples(rows, prompt_column=prompt_column, response_column=response_column,
                                    system_prompt=system_prompt, path=str(path))
    if fmt != "text" or chat_template is not None:
        ensure_chat_template(tokenizer, chat_template)
    rendered = render_sft_dataset(tokenizer, rows, examples, max_seq_len=None, train_on_prompt=train_on_prompt,
                                  path=str(path))
    return SftFileReport(str(path), fmt, rows, rendered, max_seq_len)
