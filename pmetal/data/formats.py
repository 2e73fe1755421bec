"""Read data files and normalize every row to chat messages.

`load_rows(path)` reads JSONL, JSON, Parquet or CSV/TSV (a file, a directory of such files, or a
Hugging Face hub id) into a list of dicts, remembering where each row came from so that later
errors can name the file and line/row. `detect_format(rows)` recognises the SFT layouts below and
`to_sft_examples(rows, ...)` turns every row into a list of `{"role", "content"}` messages (or, for
plain `text` rows, the text itself: no template, loss on every token).

| format            | fields of a row                                                        |
|-------------------|------------------------------------------------------------------------|
| messages          | `messages`: [{"role": "system"/"user"/"assistant"/"tool", "content"}]  |
|                   | (+ `tools` schemas, assistant `tool_calls`: pmetal.data.tool_rows)     |
| sharegpt          | `conversations`: [{"from": "human"/"gpt"/"system"/..., "value"}]       |
| reasoning         | `problem`, `thinking`, `solution` (thinking inside `<think>...</think>`) |
| alpaca            | `instruction`, optional `input`, `output`, optional `system`           |
| prompt_completion | `prompt`, `completion` (strings or message lists, as in TRL)           |
| text              | `text` (pretraining-style: no chat template, loss on everything)       |
| columns           | the columns named by `prompt_column` / `response_column`               |

The small validators (`coerce_messages`, `require_string`) are shared with the preference, KTO,
RL and embedding builders so that every data error reads the same way.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pmetal.data.tool_rows import example_tools, message_tool_fields, turn_content
from pmetal.errors import DataError, encoding_error

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT `from` values and OpenAI aliases, mapped onto the four roles above.
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
FORMATS = ("messages", "sharegpt", "reasoning", "alpaca", "prompt_completion", "text", "columns")
FORMAT_HELP = (
    "one of: 'messages' [{role, content}] (OpenAI), 'conversations' [{from, value}] (ShareGPT), "
    "'problem'+'thinking'+'solution' (reasoning), 'instruction'+'output' (+'input', Alpaca), "
    "'prompt'+'completion', 'text', or your own columns via prompt_column/response_column"
)
THINK_TAGS = ("<think>", "</think>")
# Columns that hold a list inside one row (so {"messages": [...]} is one row, not a list of rows).
ROW_LIST_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


class Rows(list):
    """A list of row dicts that also knows each row's file and 1-based row/line number."""

    def __init__(self, rows: Iterable[dict] = (), *, path: str | None = None,
                 numbers: Sequence[int] | None = None, lines: bool = False) -> None:
        super().__init__(rows)
        self._files: list[tuple[str | None, bool]] = [(path, lines)]
        self._where: list[tuple[int, int]] = [
            (0, n) for n in (numbers if numbers is not None else range(1, len(self) + 1))
        ]

    def extend_rows(self, other: Rows) -> None:
        """Append another file's rows, keeping their locations."""
        offset = len(self._files)
        self._files.extend(other._files)
        self._where.extend((f + offset, n) for f, n in other._where)
        self.extend(other)

    def locate(self, index: int) -> tuple[str | None, int, bool]:
        """(path, 1-based row or line number, is_line_number) of the row at `index`."""
        if not hasattr(self, "_where") or index >= len(self._where):
            return None, index + 1, False
        file_index, number = self._where[index]
        path, lines = self._files[file_index]
        return path, number, lines

    def error(self, index: int, message: str, *, field: str | None = None,
              expected: str | None = None) -> DataError:
        """A `DataError` pointing at the row at `index`."""
        path, number, lines = self.locate(index)
        return DataError(path, message, row=number, field=field, expected=expected, line=lines)


def locate(rows: Sequence[dict], index: int, path: str | None = None) -> tuple[str | None, int, bool]:
    """Where row `index` of `rows` came from; plain lists fall back to `path` and index + 1."""
    if isinstance(rows, Rows):
        return rows.locate(index)
    return path, index + 1, False


def row_error(rows: Sequence[dict], index: int, message: str, *, field: str | None = None,
              expected: str | None = None, path: str | None = None) -> DataError:
    """A `DataError` naming the file and row/line of `rows[index]` (works on plain lists too)."""
    where, number, lines = locate(rows, index, path)
    return DataError(where, message, row=number, field=field, expected=expected, line=lines)


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------

def example_path(name: str = "sft.jsonl") -> Path:
    """Path of a dataset shipped with pmetal (`examples/data/<name>`, installed as pmetal.examples)."""
    from importlib import resources

    return Path(str(resources.files("pmetal.examples") / "data" / name))


def load_rows(path: str | Path, *, split: str = "train") -> Rows:
    """Read a data file (or a directory of them, or a hub dataset id) into a list of row dicts.

    Args:
        path: a `.jsonl`, `.json`, `.parquet`, `.csv` or `.tsv` file; a directory (every such file
            inside, sorted by name, concatenated); or a Hugging Face dataset id like `org/name`
            (needs network access or the local `datasets` cache).
        split: the split to read from a hub dataset.

    Returns:
        `Rows`, a list of dicts that also records each row's file and 1-based row (line number for
        JSONL) so later errors can point at it.

    Raises:
        DataError: the file does not exist, has an unsupported extension, is empty, or holds a
            malformed line/row (the line number is given).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS and f.is_file())
        if not files:
            raise DataError(p, "directory holds no data files", expected=f"files ending in {', '.join(EXTENSIONS)}")
        rows = Rows()
        rows._files, rows._where = [], []
        for f in files:
            rows.extend_rows(_load_file(f))
        return rows
    if p.is_file():
        return _load_file(p)
    if p.suffix.lower() not in EXTENSIONS and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        return _load_hub(str(path), split)
    raise DataError(p, "file not found", expected="a path to an existing data file or directory")


def _load_file(p: Path) -> Rows:
    suffix = p.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(p, f"unsupported file extension '{p.suffix}'", expected=", ".join(EXTENSIONS))
    if p.stat().st_size == 0:
        raise DataError(p, "file is empty", expected="at least one row")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    try:
        rows = readers[suffix](p) if suffix in readers else _read_csv(p, delimiter="\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError:
        raise encoding_error(p) from None
    if not rows:
        raise DataError(p, "file holds no rows", expected="at least one row")
    return rows


def _read_jsonl(p: Path) -> Rows:
    rows, numbers = [], []
    with open(p, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(p, f"malformed JSON: {e.msg} (column {e.colno})", row=number, line=True,
                                expected="one JSON object per line") from None
            if not isinstance(value, dict):
                raise DataError(p, f"line holds a JSON {type(value).__name__}, not an object", row=number,
                                line=True, expected='one JSON object per line, e.g. {"messages": [...]}')
            rows.append(value)
            numbers.append(number)
    return Rows(rows, path=str(p), numbers=numbers, lines=True)


def _read_json(p: Path) -> Rows:
    text = p.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: a JSONL file with a .json name
            return _read_jsonl(p)
        raise DataError(p, f"malformed JSON: {e.msg} (column {e.colno})", row=e.lineno, line=True,
                        expected="a JSON array of objects") from None
    if isinstance(value, dict):
        (key, inner), = value.items() if len(value) == 1 else ((None, None),)
        # {"data": [...]} wraps the rows; {"messages": [...]} is itself one row.
        value = inner if isinstance(inner, list) and key not in ROW_LIST_FIELDS else [value]
    if not isinstance(value, list):
        raise DataError(p, f"top-level JSON value is a {type(value).__name__}", expected="a JSON array of objects")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(p, f"element is a JSON {type(item).__name__}, not an object", row=i + 1,
                            expected="a JSON array of objects")
    return Rows(value, path=str(p))


def _read_parquet(p: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(p, f"cannot read Parquet file: {e}", expected="a valid Parquet file") from None
    return Rows(table.to_pylist(), path=str(p))


def _read_csv(p: Path, delimiter: str) -> Rows:
    csv.field_size_limit(1 << 30)
    rows = []
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(p, "file has no header row", expected="a header line naming the columns")
            for number, cells in enumerate(reader, start=1):
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise DataError(p, f"row has {len(cells)} cells but the header has {len(header)}", row=number,
                                    expected=f"{len(header)} cells: {', '.join(header)}")
                rows.append(dict(zip(header, cells)))
        except csv.Error as e:
            raise DataError(p, f"malformed CSV: {e}", row=reader.line_num, line=True) from None
    return Rows(rows, path=str(p))


def _load_hub(name: str, split: str) -> Rows:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, missing split: all are user-fixable
        raise DataError(name, f"not a local file, and loading it as a Hugging Face dataset failed: {e}",
                        expected="a local .jsonl/.json/.parquet/.csv file or a reachable dataset id") from None
    return Rows(ds.to_list(), path=name)


# ----------------------------------------------------------------------------------------------
# Validating values
# ----------------------------------------------------------------------------------------------

def require_string(rows: Sequence[dict], index: int, field: str, *, allow_empty: bool = False,
                   path: str | None = None) -> str:
    """`rows[index][field]` as a string, or a `DataError` naming file, row and field."""
    row = rows[index]
    if field not in row or row[field] is None:
        raise row_error(rows, index, "missing value", field=field, expected="a string", path=path)
    value = row[field]
    if not isinstance(value, str):
        raise row_error(rows, index, f"value is a {type(value).__name__}, not a string", field=field,
                        expected="a string", path=path)
    if not allow_empty and not value.strip():
        raise row_error(rows, index, "value is empty", field=field, expected="a non-empty string", path=path)
    return value


def coerce_messages(rows: Sequence[dict], index: int, field: str, value: Any = None, *,
                    path: str | None = None) -> list[dict[str, str]]:
    """Validate a conversation and return it as `[{"role", "content"}]` with canonical roles.

    Accepts OpenAI messages (`role`/`content`, content may be a list of `{"type": "text", "text"}`
    parts) and ShareGPT turns (`from`/`value`). Roles are mapped through `ROLE_ALIASES`.

    Args:
        rows: the rows (a `Rows` gives file and line in errors).
        index: which row.
        field: the column holding the conversation (named in errors).
        value: the conversation; defaults to `rows[index][field]`.
        path: file name for errors when `rows` is a plain list.

    Raises:
        DataError: not a list, empty, a turn that is not an object, a missing/unknown role, or
            non-string content; the message names file, row and field (e.g. `messages[2].role`).
    """
    if value is None:
        value = rows[index].get(field)
    if not isinstance(value, list):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise row_error(rows, index, f"conversation is {got}", field=field,
                        expected='a list of {"role", "content"} objects', path=path)
    if not value:
        raise row_error(rows, index, "conversation is empty", field=field, expected="at least one message", path=path)
    messages = []
    for t, turn in enumerate(value):
        where = f"{field}[{t}]"
        if not isinstance(turn, dict):
            raise row_error(rows, index, f"message is a {type(turn).__name__}, not an object", field=where,
                            expected='{"role": ..., "content": ...}', path=path)
        role_key = "role" if "role" in turn else "from" if "from" in turn else None
        content_key = "content" if "content" in turn else "value" if "value" in turn else None
        if role_key is None:
            raise row_error(rows, index, f"message has no role (keys: {', '.join(map(str, turn)) or 'none'})",
                            field=where, expected="a 'role' (or ShareGPT 'from') key", path=path)
        role = turn[role_key]
        canonical = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if canonical is None:
            raise row_error(rows, index, f"unknown role {role!r}", field=f"{where}.{role_key}",
                            expected=f"one of {', '.join(ROLES)} (ShareGPT: human, gpt, system)", path=path)
        content = turn_content(turn, canonical, content_key)  # "" for a turn of tool calls alone
        if content is None and content_key is None:
            raise row_error(rows, index, "message has no content", field=where,
                            expected="a 'content' (or ShareGPT 'value') key", path=path)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise row_error(rows, index, f"content is a {type(content).__name__}, not a string",
                            field=f"{where}.{content_key}", expected="a string", path=path)
        messages.append(message_tool_fields(turn, {"role": canonical, "content": content}, where, partial(row_error, rows, index, path=path)))
    return messages


# ----------------------------------------------------------------------------------------------
# Detecting the SFT format and normalizing rows
# ----------------------------------------------------------------------------------------------

@dataclass
class SftExample:
    """One normalized SFT row: either chat `messages` or raw `text` (no template, loss on all)."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    tools: list[dict] | None = None  # the row's tool schemas (pmetal.data.tool_rows)


def detect_format(rows: Sequence[dict], *, prompt_column: str | None = None,
                  response_column: str | None = None, path: str | None = None) -> str:
    """Name the SFT format of `rows` (one of `FORMATS`) from the first row's columns.

    Raises:
        DataError: the columns match no known format (the message lists the columns found and the
            accepted formats), or a `prompt_column`/`response_column` is missing.
    """
    if not rows:
        raise DataError(path, "no rows", expected="at least one row")
    keys = set(rows[0])
    if prompt_column or response_column:
        for name, column in (("prompt_column", prompt_column), ("response_column", response_column)):
            if not column:
                raise DataError(path, f"{name} is not set", expected="both prompt_column and response_column")
            if column not in keys:
                raise row_error(rows, 0, f"column '{column}' (from {name}) not found; columns: {_columns(keys)}",
                                field=column, expected=f"a column named '{column}'", path=path)
        return "columns"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"problem", "thinking", "solution"} <= keys:
        return "reasoning"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise row_error(rows, 0, f"cannot tell the data format from the columns: {_columns(keys)}",
                    expected=FORMAT_HELP, path=path)


def _columns(keys: Iterable[str]) -> str:
    return ", ".join(sorted(map(str, keys))) or "(none)"


def to_sft_examples(rows: Sequence[dict], *, fmt: str | None = None, prompt_column: str | None = None,
                    response_column: str | None = None, system_prompt: str | None = None,
                    think_tags: tuple[str, str] = THINK_TAGS, path: str | None = None) -> tuple[str, list[SftExample]]:
    """Detect the format (unless `fmt` is given) and normalize every row.

    Args:
        rows: rows from `load_rows` (or any list of dicts; then pass `path` for error messages).
        fmt: force a format name from `FORMATS` instead of detecting it.
        prompt_column: a custom column holding the user prompt (needs `response_column`).
        response_column: a custom column holding the assistant answer.
        system_prompt: prepended as a system message to conversations that have none.
        think_tags: the opening/closing tags the `thinking` of reasoning rows is wrapped in.
        path: file name for errors when `rows` is a plain list.

    Returns:
        (format name, one `SftExample` per row, in order).

    Raises:
        DataError: unknown columns, non-string content, an empty conversation, an unknown role,
            or a conversation without an assistant turn; each names file, row and field.
    """
    fmt = fmt or detect_format(rows, prompt_column=prompt_column, response_column=response_column, path=path)
    if fmt not in FORMATS:
        raise DataError(path, f"unknown format '{fmt}'", expected=", ".join(FORMATS))
    examples = []
    for i in range(len(rows)):
        if fmt == "text":
            examples.append(SftExample(text=require_string(rows, i, "text", path=path)))
            continue
        messages = _row_messages(rows, i, fmt, prompt_column, response_column, think_tags, path)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        if not any(m["role"] == "assistant" for m in messages):
            field = {"messages": "messages", "sharegpt": "conversations"}.get(fmt)
            raise row_error(rows, i, "conversation has no assistant message to learn from", field=field,
                            expected="at least one assistant (ShareGPT: gpt) message", path=path)
        examples.append(SftExample(messages=messages, tools=example_tools(rows[i], fmt, partial(row_error, rows, i, path=path))))
    return fmt, examples


def _row_messages(rows, i, fmt, prompt_column, response_column, think_tags, path) -> list[dict[str, str]]:
    row = rows[i]
    if fmt == "messages":
        return coerce_messages(rows, i, "messages", path=path)
    if fmt == "sharegpt":
        return coerce_messages(rows, i, "conversations", path=path)
    if fmt == "reasoning":
        problem = require_string(rows, i, "problem", path=path)
        thinking = require_string(rows, i, "thinking", allow_empty=True, path=path)
        solution = require_string(rows, i, "solution", path=path)
        open_tag, close_tag = think_tags
        answer = f"{open_tag}\n{thinking.strip()}\n{close_tag}\n\n{solution}"
        return [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}]
    if fmt == "alpaca":
        instruction = require_string(rows, i, "instruction", path=path)
        extra = require_string(rows, i, "input", allow_empty=True, path=path) if row.get("input") is not None else ""
        output = require_string(rows, i, "output", path=path)
        messages = []
        if row.get("system") is not None:
            messages.append({"role": "system", "content": require_string(rows, i, "system", path=path)})
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "prompt_completion":
        prompt = row.get("prompt")
        completion = row.get("completion")
        prompt_messages = (coerce_messages(rows, i, "prompt", path=path) if isinstance(prompt, list)
                           else [{"role": "user", "content": require_string(rows, i, "prompt", path=path)}])
        completion_messages = (coerce_messages(rows, i, "completion", path=path) if isinstance(completion, list)
                               else [{"role": "assistant",
                                      "content": require_string(rows, i, "completion", path=path)}])
        return prompt_messages + completion_messages
    # custom columns
    return [{"role": "user", "content": require_string(rows, i, prompt_column, path=path)},
            {"role": "assistant", "content": require_string(rows, i, response_column, path=path)}]
