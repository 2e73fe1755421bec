"""`SftDataModule`: a data file -> rendered, masked, length-grouped (or packed) SFT batches.

Pipeline: `formats.load_rows` -> `formats.to_sft_examples` (format detection, validation) ->
`render.render_sft_dataset` (chat template, assistant-only labels, truncation) -> a train/val
split -> `ResumableDataLoader` over length-grouped batches (`collate.PaddingCollator`) or, with
`packing=True`, over best-fit-decreasing bins (`packing.pack_rows` / `packing.packed_collate`).
The train loader is resumable mid-epoch (see `pmetal.data.sampler`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pmetal.data.base import PmetalDataModule, check_val_fraction, held_out_split
from pmetal.data.collate import PaddingCollator
from pmetal.data.formats import example_path, load_rows, locate, to_sft_examples
from pmetal.data.render import RenderedDataset, ensure_chat_template, render_sft_dataset
from pmetal.data.sampler import LengthGroupedBatchSampler, ResumableDataLoader
from pmetal.tokens import IGNORE_INDEX
from pmetal.errors import DataError, PmetalError

log = logging.getLogger("pmetal")


@dataclass
class SftDataStats:
    """What `setup()` found; `summary()` is the line the datamodule logs."""

    path: str
    format: str
    rows: int
    truncated: int
    dropped: int
    train_rows: int
    val_rows: int
    train_tokens: int
    train_trained_tokens: int
    max_seq_len: int
    assistant_first: int = 0

    def summary(self) -> str:
        return (f"data: {self.path} | format {self.format} | {self.rows} rows | {self.truncated} truncated to "
                f"{self.max_seq_len} tokens | {self.dropped} without trainable tokens (skipped) | "
                f"{self.assistant_first} opening with an assistant turn (not trained) | "
                f"train {self.train_rows} / val {self.val_rows} rows | {self.train_tokens} train tokens, "
                f"{self.train_trained_tokens} with loss")


class PackedBinsCollator:
    """Collates a batch of bins (each a list of rows) into a stacked packed batch [B, T]."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_id, self.multiple = pad_id, max(1, pad_to_multiple_of)

    def __call__(self, bins: list[list[dict]]) -> dict:
        from pmetal.data.packing import packed_collate, stack_packed

        packed = [packed_collate(b) for b in bins]
        longest = max(p["input_ids"].shape[1] for p in packed)
        return stack_packed(packed, -(-longest // self.multiple) * self.multiple, pad_id=self.pad_id)


class SftDataModule(PmetalDataModule):
    """Supervised fine-tuning data: chat conversations (or plain text) with assistant-only loss.

    Accepted file layouts (detected per file): OpenAI `messages`, ShareGPT `conversations`,
    Alpaca `instruction`/`input`/`output`, reasoning `problem`/`thinking`/`solution`,
    `prompt`/`completion`, plain `text`, or your own columns (`prompt_column`/`response_column`).

    Args:
        path: training data: a .jsonl/.json/.parquet/.csv file, a directory of them, or a hub
            dataset id. None uses pmetal's small shipped example (examples/data/sft.jsonl).
        eval_path: validation data in the same layout; None holds out `val_fraction` of `path`.
        val_fraction: fraction of the training rows held out for validation when there is no
            `eval_path` (at least one row when positive); 0 disables validation.
        batch_size: rows per batch; with packing, packed rows (bins of `pack_tokens` tokens) per batch.
        max_seq_len: rows longer than this many tokens are truncated (the count is logged).
        prompt_column: a custom column holding the user prompt (with `response_column`).
        response_column: a custom column holding the assistant answer.
        system_prompt: a system message prepended to every conversation that has none.
        chat_template: None uses the model's template; "chatml" the generic ChatML template (for
            models without one); or a Jinja template string / .jinja file.
        train_on_prompt: also put the loss on system/user turns and template tokens.
        packing: pack several rows into one sequence without padding (attention stays per row);
            on by default, `packing: false` pads each batch to its longest row instead.
        pack_tokens: tokens per packed row (bin); None means max_seq_len. A batch stacks
            `batch_size` bins.
        pad_to_multiple_of: round padded batch lengths up to a multiple of this (8 suits tensor
            cores); 1 pads to the longest row only.
        seed: seed of the validation split and the per-epoch batch order.
        num_workers: DataLoader worker processes (0 = load in the training process).
        tokenizer: the tokenizer to render with; None takes the LightningModule's `tokenizer`.
        processor: a vision-language model's processor: rows then carry images (`pmetal.data.vlm`;
            padded, never packed); None takes the LightningModule's `processor` when it has one.
    """

    def __init__(
        self,
        path: str | None = None,
        eval_path: str | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 1,
        max_seq_len: int = 1024,
        prompt_column: str | None = None,
        response_column: str | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        train_on_prompt: bool = False,
        packing: bool = True,
        pack_tokens: int | None = None,
        pad_to_multiple_of: int = 1,
        seed: int = 42,
        num_workers: int = 0,
        tokenizer: Any = None,
        processor: Any = None,
    ) -> None:
        super().__init__()
        check_val_fraction(val_fraction)
        if batch_size < 1 or max_seq_len < 2 or pad_to_multiple_of < 1:
            raise PmetalError("batch_size and pad_to_multiple_of must be >= 1 and max_seq_len >= 2")
        self.path = str(path) if path is not None else str(example_path())
        self.eval_path, self.val_fraction = eval_path, val_fraction
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.prompt_column, self.response_column = prompt_column, response_column
        self.system_prompt, self.chat_template, self.train_on_prompt = system_prompt, chat_template, train_on_prompt
        self.packing = packing
        self.pack_tokens = pack_tokens if pack_tokens is not None else max_seq_len
        if packing and self.pack_tokens < max_seq_len:
            raise PmetalError(f"pack_tokens ({self.pack_tokens}) must be at least max_seq_len ({max_seq_len})")
        self.pad_to_multiple_of, self.seed, self.num_workers = pad_to_multiple_of, seed, num_workers
        self.tokenizer, self.processor = tokenizer, processor
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] = []
        self.stats: SftDataStats | None = None

    # ------------------------------------------------------------------------------ preparing
    def prepare(self) -> None:
        tokenizer = self._tokenizer()
        train_set, fmt, n_rows = self._render(self.path, tokenizer)
        rows = list(zip(train_set.rows, train_set.source))
        truncated, dropped = train_set.truncated, len(train_set.dropped)
        assistant_first = len(train_set.assistant_first)
        if self.eval_path:
            val_set, _, n_val_rows = self._render(self.eval_path, tokenizer)
            val = val_set.rows
            n_rows += n_val_rows
            truncated, dropped = truncated + val_set.truncated, dropped + len(val_set.dropped)
            assistant_first += len(val_set.assistant_first)
        else:
            rows, held = held_out_split(rows, self.val_fraction, self.seed, path=self.path)
            val = [r for r, _ in held]
        self.train_rows, self.val_rows = [r for r, _ in rows], val
        self.stats = SftDataStats(
            path=self.path, format=fmt, rows=n_rows, truncated=truncated, dropped=dropped,
            train_rows=len(self.train_rows), val_rows=len(self.val_rows),
            train_tokens=sum(len(r["input_ids"]) for r in self.train_rows),
            train_trained_tokens=sum(1 for r in self.train_rows for x in r["labels"] if x != IGNORE_INDEX),
            max_seq_len=self.max_seq_len, assistant_first=assistant_first,
        )
        log.info(self.stats.summary())
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    def _tokenizer(self) -> Any:
        from pmetal.data.render import datamodule_tokenizer

        return datamodule_tokenizer(self)

    def _render(self, path: str, tokenizer: Any) -> tuple[RenderedDataset, str, int]:
        rows = load_rows(path)
        from pmetal.data.vlm import render_vlm_dataset, vlm_processor

        if (processor := vlm_processor(self)) is not None:  # a VLM: image + text rows (pmetal.data.vlm)
            rendered, fmt = render_vlm_dataset(processor, rows, path=path, max_seq_len=self.max_seq_len,
                                               train_on_prompt=self.train_on_prompt, prompt_column=self.prompt_column,
                                               response_column=self.response_column, system_prompt=self.system_prompt,
                                               chat_template=self.chat_template)
            return self._checked(rendered, rows, path), fmt, len(rows)
        fmt, examples = to_sft_examples(rows, prompt_column=self.prompt_column, response_column=self.response_column,
                                        system_prompt=self.system_prompt, path=path)
        if fmt != "text" or self.chat_template is not None:
            ensure_chat_template(tokenizer, self.chat_template)
        rendered = render_sft_dataset(tokenizer, rows, examples, max_seq_len=self.max_seq_len,
                                      train_on_prompt=self.train_on_prompt, path=path)
        return self._checked(rendered, rows, path), fmt, len(rows)

    def _checked(self, rendered: RenderedDataset, rows, path: str) -> RenderedDataset:
        if rendered.dropped:
            log.warning("%s: %d row(s) have no trainable token after truncation to %d (rows/lines %s); skipped",
                        path, len(rendered.dropped), self.max_seq_len, _row_numbers(rows, rendered.dropped, path))
        if rendered.assistant_first:
            log.warning("%s: %d row(s) open with an assistant message, which has no prompt and is not trained on "
                        "(rows/lines %s); the later turns are", path, len(rendered.assistant_first),
                        _row_numbers(rows, rendered.assistant_first, path))
        if not rendered.rows:
            raise DataError(path, "no row has a token to learn from", expected="rows with a non-empty assistant answer "
                            f"that fits within max_seq_len={self.max_seq_len}")
        return rendered

    # ------------------------------------------------------------------------------ tokens
    @property
    def train_tokens(self) -> int:
        """Tokens (prompt + answer, no padding) in one pass over the training rows."""
        return self.stats.train_tokens if self.stats else 0

    @property
    def trainable_tokens(self) -> int:
        """Tokens carrying a loss in one pass over the training rows (for throughput)."""
        return self.stats.train_trained_tokens if self.stats else 0

    # ------------------------------------------------------------------------------ loaders
    def _loader(self, rows: list[dict], shuffle: bool) -> ResumableDataLoader:
        # A global batch is `batch_size` rows (or bins) per rank; each rank trains on its own part.
        lengths = [len(r["input_ids"]) for r in rows]
        from pmetal.data.vlm import VlmCollator, vlm_processor

        processor = vlm_processor(self)
        if processor is not None:  # image rows are padded, never packed: each row keeps its images and positions
            sampler = LengthGroupedBatchSampler(lengths, self.batch_size, seed=self.seed, shuffle=shuffle)
            collate = VlmCollator(processor, self._pad_id, self.pad_to_multiple_of, max_length=self.max_seq_len)
        elif self.packing:
            from pmetal.data.packing import pack_rows

            # Rows are packed into bins of `pack_tokens`, and `batch_size` bins are stacked into
            # [B, T]: attention work stays O(B·T²) as in padded training, not O(N²) over one long row.
            bins = pack_rows(lengths, self.pack_tokens)
            rows = [[rows[i] for i in b] for b in bins]
            sampler = LengthGroupedBatchSampler([sum(lengths[i] for i in b) for b in bins], self.batch_size,
                                                seed=self.seed, shuffle=shuffle)
            collate = PackedBinsCollator(self._pad_id, self.pad_to_multiple_of)
        else:
            sampler = LengthGroupedBatchSampler(lengths, self.batch_size, seed=self.seed, shuffle=shuffle)
            collate = PaddingCollator(self._pad_id, self.pad_to_multiple_of, max_length=self.max_seq_len)
        return self.resumable_loader(rows, collate, shuffle=shuffle, batch_sampler=sampler)

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup("fit")
        return self._loader(self.train_rows, shuffle=True)

    def val_dataloader(self) -> ResumableDataLoader | list:
        self.setup("fit")
        return self._loader(self.val_rows, shuffle=False) if self.val_rows else []


def _row_numbers(rows, indices: list[int], path: str, shown: int = 5) -> str:
    """The first few 1-based rows/lines of `indices`, for a warning."""
    text = ", ".join(str(locate(rows, i, path)[1]) for i in indices[:shown])
    return text + (", ..." if len(indices) > shown else "")
