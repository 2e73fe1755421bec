"""Tool-calling rows for SFT: the `tools` column and assistant `tool_calls`, validated one row at a time.

A row's `tools` is a list of JSON schemas (`{"type": "function", "function": {"name", "description",
"parameters"}}` or the bare function part) or of `package.module:function` import strings, whose
schema transformers' `get_json_schema` reads from the function's type hints and docstring. An
assistant message's `tool_calls` is a list of OpenAI calls (`{"type": "function", "function":
{"name", "arguments"}}`, arguments an object or a JSON string) or bare `{"name", "arguments"}`.
Every problem is a `DataError` naming the file, the row, the field and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pmetal.errors import DataError

CALL_EXPECTED = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
SCHEMA_EXPECTED = ('a JSON schema {"type": "function", "function": {"name", "description", "parameters"}} '
                   "or a package.module:function string")


Fail = Callable[..., DataError]  # fail(message, field=..., expected=...): the row's DataError (formats.row_error)
TOOL_FORMATS = ("messages", "sharegpt", "prompt_completion")  # the SFT formats whose rows may carry `tools`


def turn_content(turn: dict, role: str, content_key: str | None) -> Any:
    """A turn's content as written; "" for an assistant turn of tool calls alone (content missing or null)."""
    content = turn[content_key] if content_key is not None else None
    return "" if content is None and role == "assistant" and turn.get("tool_calls") else content


def example_tools(row: dict, fmt: str, fail: Fail) -> list[dict] | None:
    """The tool schemas of an SFT row in a conversational format (None for other formats)."""
    return row_tools(row, fail) if fmt in TOOL_FORMATS else None


def message_tool_fields(turn: dict, message: dict, where: str, fail: Fail) -> dict:
    """`message` with the source turn's `tool_calls` (assistant) or `name`/`tool_call_id` (tool) kept."""
    if message["role"] == "assistant" and turn.get("tool_calls"):
        message["tool_calls"] = coerce_tool_calls(f"{where}.tool_calls", turn["tool_calls"], fail)
    for key in ("name", "tool_call_id") if message["role"] == "tool" else ():
        if isinstance(turn.get(key), str):
            message[key] = turn[key]
    return message


def coerce_tool_calls(field: str, value: Any, fail: Fail) -> list[dict]:
    """An assistant message's `tool_calls` as OpenAI calls with `arguments` as a dict."""
    if not isinstance(value, list):
        raise fail(f"tool_calls is a {type(value).__name__}, not a list", field=field,
                     expected=f"a list of {CALL_EXPECTED}")
    calls = []
    for c, call in enumerate(value):
        where = f"{field}[{c}]"
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise fail("tool call has no function name", field=where, expected=CALL_EXPECTED)
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise fail(f"arguments are not valid JSON ({e.msg})", field=f"{where}.function.arguments",
                             expected="a JSON object (or a string holding one)") from None
        if not isinstance(arguments, dict):
            raise fail(f"arguments are a {type(arguments).__name__}", field=f"{where}.function.arguments",
                         expected="a JSON object (or a string holding one)")
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def row_tools(row: dict, fail: Fail, field: str = "tools") -> list[dict] | None:
    """The row's tool schemas (None when the row has no `tools` column or it is empty)."""
    from pmetal.tools.format import function_schema, schema_name

    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, str):  # a CSV/Parquet cell holding the JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise fail(f"tools is a string that is not JSON ({e.msg})", field=field,
                         expected=f"a list of {SCHEMA_EXPECTED}") from None
    if not isinstance(value, list):
        raise fail(f"tools is a {type(value).__name__}, not a list", field=field,
                     expected=f"a list of {SCHEMA_EXPECTED}")
    schemas = []
    for t, tool in enumerate(value):
        where = f"{field}[{t}]"
        if isinstance(tool, str):
            schemas.append(_schema_of_function(where, tool, fail, function_schema))
            continue
        if not isinstance(tool, dict) or schema_name(tool) is None:
            raise fail("tool schema has no function name", field=where, expected=SCHEMA_EXPECTED)
        schemas.append(tool if "function" in tool else {"type": "function", "function": tool})
    return schemas or None


_SCHEMAS: dict[str, dict] = {}  # import string -> schema: a file names the same tools on every row


def _schema_of_function(where, spec, fail, function_schema) -> dict:
    from pmetal.tools.runner import resolve_tool

    if spec in _SCHEMAS:
        return _SCHEMAS[spec]
    try:
        return _SCHEMAS.setdefault(spec, function_schema(resolve_tool(spec)))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - an import or a docstring get_json_schema cannot read
        raise fail(f"cannot build a schema from {spec!r}: {e}", field=where,
                     expected="a function with type hints and a docstring with an Args: section") from None
