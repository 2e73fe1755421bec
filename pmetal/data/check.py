"""Which kind of training data a file holds, and every row of it checked without a tokenizer.

Five kinds of data feed pmetal's methods (the method table, `pmetal.cli.methods`, names each
method's kind): SFT conversations, preference pairs, KTO feedback, RL prompts and embedding pairs.
`detect_kind(rows)` tells them apart from the first row's columns; `check_rows(rows, kind)` runs
the same row converters the DataModules run (so the same one-line `DataError` naming file,
row and field) but without rendering or tokenizing, so `pmetal dataset validate` and the commands'
up-front checks (`pmetal.cli.preflight`) find a bad row before any model loads. Rows holding
images (an `image`/`images` column, or content parts) are a vision-language model's: their
converters need its processor, so they are checked when the DataModule renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pmetal.errors import DataError


@dataclass(frozen=True)
class DataKind:
    name: str
    example: str  # the file under examples/data shipped for it
    describes: str


KINDS: dict[str, DataKind] = {k.name: k for k in [
    DataKind("sft", "sft.jsonl", "conversations or instruction data (SFT)"),
    DataKind("preference", "dpo.jsonl", "preference pairs: prompt, chosen, rejected (DPO, SimPO, ORPO)"),
    DataKind("kto", "kto.jsonl", "unpaired feedback: prompt, completion, label (KTO)"),
    DataKind("prompts", "grpo.jsonl", "prompts for rollouts, with the columns rewards read (GRPO, DAPO, RLKD)"),
    DataKind("embedding", "embed.jsonl", "embedding pairs, scored pairs or triplets (embed)"),
]}
KINDS_HELP = ("SFT conversations ('messages', 'conversations', 'instruction'+'output', 'prompt'+'completion', "
              "'text'), preference pairs ('prompt'+'chosen'+'rejected'), KTO feedback ('prompt'+'completion'"
              "+'label'), RL prompts ('prompt' or 'question' or 'problem', plus reward columns such as 'answer') "
              "or embedding pairs ('anchor'+'positive', 'sentence1'+'sentence2', ...)")
PROMPT_FIELDS = ("prompt", "question", "problem")
KTO_COMPLETION_FIELDS = ("completion", "response", "output")


def detect_kind(rows: Sequence[dict], *, path: str | None = None, prompt_column: str | None = None,
                response_column: str | None = None) -> str:
    """The kind of data (a key of `KINDS`) the first row's columns say the file holds.

    RL prompts are told from SFT rows by what else the row holds: nothing but the prompt (and
    images), or a column a built-in reward reads (`answer`, `solution`); `question, reply` stays
    an unknown SFT layout rather than prompts with a stray column.
    """
    from pmetal.data.embedding import PAIR_FIELDS
    from pmetal.data.formats import detect_format, row_error
    from pmetal.rewards import REQUIRED_COLUMNS

    if not rows:
        raise DataError(path, "no rows", expected="at least one row")
    keys = set(rows[0])
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "label" in keys and keys & set(KTO_COMPLETION_FIELDS) and keys & set(PROMPT_FIELDS):
        return "kto"
    if any(a in keys and b in keys for a, b in PAIR_FIELDS):
        return "embedding"
    try:
        detect_format(rows, path=path, prompt_column=prompt_column, response_column=response_column)
        return "sft"
    except DataError:
        if prompt_column or response_column:
            raise
    reward_columns = {c for columns in REQUIRED_COLUMNS.values() for c in columns}
    if keys & set(PROMPT_FIELDS) and (keys & reward_columns or keys <= {*PROMPT_FIELDS, "image", "images"}):
        return "prompts"
    found = ", ".join(sorted(map(str, keys))) or "(none)"
    raise row_error(rows, 0, f"cannot tell the data format from the columns: {found}", expected=KINDS_HELP,
                    path=path)


def holds_images(row: dict) -> bool:
    """An image column, or a message whose content is a list of parts (images among them)."""
    from pmetal.data.images import image_column

    if image_column(row) is not None:
        return True
    return any(isinstance(value, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list)
                                               for m in value) for value in row.values())


def check_rows(rows: Sequence[dict], kind: str, *, path: str | None = None, prompt_column: str | None = None,
               response_column: str | None = None, system_prompt: str | None = None,
               score_range: Any = (0.0, 5.0), raw: bool = False) -> tuple[str, int]:
    """(format or layout, usable examples) of `rows` read as `kind`; a bad row raises its `DataError`.

    `raw`: preference/KTO prompts kept as text (`chat_template=False`), as their DataModule does.
    Image rows are counted, not converted (see the module docstring).
    """
    if rows and holds_images(rows[0]):
        return "with images (checked when rendered)", len(rows)
    if kind == "sft":
        from pmetal.data.formats import to_sft_examples

        fmt, examples = to_sft_examples(rows, prompt_column=prompt_column, response_column=response_column,
                                        system_prompt=system_prompt, path=path)
        return fmt, len(examples)
    if kind == "preference":
        from pmetal.data.preference import to_preference_pairs

        pairs, _ = to_preference_pairs(rows, system_prompt=system_prompt, path=path, raw=raw)
        return "prompt/chosen/rejected", len(pairs)
    if kind == "kto":
        from pmetal.data.kto import to_kto_examples

        return "prompt/completion/label", len(to_kto_examples(rows, system_prompt=system_prompt, path=path, raw=raw))
    if kind == "prompts":
        from pmetal.data.prompts import row_to_prompt

        for i in range(len(rows)):
            row_to_prompt(rows, i, prompt_column=prompt_column, path=path)
        return "prompts", len(rows)
    if kind == "embedding":
        from pmetal.data.embedding import to_embedding_examples

        layout, examples = to_embedding_examples(rows, score_range=score_range, path=path)
        return layout, len(examples)
    raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
