"""The one tool-calling text format: what SFT trains, what rollouts parse, what `pmetal serve` parses.

A model calls a tool by answering

    <tool_call>{"name": "lookup", "arguments": {"key": "zorblat"}}</tool_call>

(one block per call; text around the blocks is the turn's content). A chat template that takes
`tools` (Qwen2.5/3, Llama 3.1, Hermes-style templates) gets the schemas, the assistant
`tool_calls` and the `tool` messages as they are and already asks for this format. A template
without tools (the embedded SmolLM2's) gets the fallback, `fallback_messages`:

- the tool schemas are described in the system turn (`tools_system_text`), appended to the
  row's own system message or as a new first message;
- an assistant message's `tool_calls` are appended to its content as `<tool_call>` blocks;
- a `tool` result becomes a user turn `<tool_response>{result}</tool_response>` (the turn Qwen's
  and Hermes' templates render for tool results), so any template that knows only
  system/user/assistant renders it.

Only assistant turns are ever trained, so tool results never carry a loss.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


def template_takes_tools(tokenizer) -> bool:
    """The tokenizer's chat template renders `tools` itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def tools_system_text(tools: Sequence[dict]) -> str:
    """The system-message description of `tools` for a template that cannot take them."""
    listed = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    return ("You may call these tools:\n" + listed + "\nTo call one, answer with "
            '<tool_call>{"name": <tool name>, "arguments": <arguments object>}</tool_call> '
            "(one block per call).")


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{TOOL_CALL_CLOSE}"


def response_text(content: str) -> str:
    """A tool result as the fallback's user turn holds it."""
    return f"{TOOL_RESPONSE_OPEN}{content}{TOOL_RESPONSE_CLOSE}"


def plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as `{"role", "content"}` text turns for a template that knows no tool roles."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        role = m["role"]
        if role == "developer":
            role = "system"
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            content += call_text(fn.get("name"), fn.get("arguments", {}))
        if role == "tool":
            role, content = "user", response_text(content)
        out.append({"role": role, "content": content})
    return out


def fallback_messages(messages: Sequence[dict], tools: Sequence[dict] | None) -> list[dict]:
    """The fallback format (module docstring): tool schemas in the system turn, calls and results as text."""
    turns = plain_messages(messages)
    if tools:
        described = tools_system_text(tools)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + described}
        else:
            turns.insert(0, {"role": "system", "content": described})
    return turns


def uses_tools(messages: Sequence[dict], tools: Sequence[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def template_inputs(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None) -> tuple[list[dict], list | None]:
    """`(messages, tools)` to hand to `apply_chat_template`: as they are for a template that takes
    tools, else the fallback's text turns and no tools."""
    if template_takes_tools(tokenizer):
        return list(messages), (list(tools) if tools else None)
    return fallback_messages(messages, tools), None


# ----------------------------------------------------------------------------------------------
# Parsing calls
# ----------------------------------------------------------------------------------------------

@dataclass
class ParsedTurn:
    """The tool calls in one assistant turn.

    Attributes:
        content: the text outside the call blocks (stripped).
        calls: `{"name", "arguments": dict}` of every well-formed block, in order.
        errors: one message per malformed block (not JSON, not an object, no name, arguments
            that are not an object), in order; the rollouts hand them to the model as tool results.
    """

    content: str
    calls: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_turn(text: str) -> ParsedTurn:
    """Every `<tool_call>` block of `text`, well-formed or not (an unclosed `<tool_call>` is malformed)."""
    calls, errors, kept, cursor = [], [], [], 0
    for match in TOOL_CALL.finditer(text):
        kept.append(text[cursor: match.start()])
        cursor = match.end()
        call, error = _one_call(match.group(1))
        if error:
            errors.append(error)
        else:
            calls.append(call)
    rest = text[cursor:]
    if TOOL_CALL_OPEN in rest:
        errors.append(f"malformed tool call: {TOOL_CALL_OPEN} without {TOOL_CALL_CLOSE}")
        rest = rest[: rest.index(TOOL_CALL_OPEN)]
    kept.append(rest)
    return ParsedTurn("".join(kept).strip(), calls, errors)


def _one_call(body: str) -> tuple[dict | None, str | None]:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return None, f"malformed tool call: not JSON ({e.msg} at column {e.colno})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None, 'malformed tool call: expected {"name": <tool name>, "arguments": {...}}'
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None, f"malformed tool call to {call['name']!r}: arguments are not a JSON object"
    if not isinstance(arguments, dict):
        return None, f"malformed tool call to {call['name']!r}: arguments are not a JSON object"
    return {"name": call["name"], "arguments": arguments}, None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """`(content, tool_calls)` of a reply as OpenAI returns them (arguments as a JSON string); a
    malformed block stays in the content (the server answers what the model wrote)."""
    calls, kept, cursor = [], [], 0
    for match in TOOL_CALL.finditer(text):
        call, error = _one_call(match.group(1))
        if error is not None:
            continue
        kept.append(text[cursor: match.start()])
        cursor = match.end()
        calls.append(openai_call(call))
    kept.append(text[cursor:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def openai_call(call: dict) -> dict:
    """`{"name", "arguments": dict}` as an OpenAI tool call (arguments as a JSON string)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------

def function_schema(fn: Callable) -> dict:
    """The JSON schema of a Python function (transformers' `get_json_schema`: type hints and a
    Google-style docstring with an `Args:` line per parameter)."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


def schema_name(schema: dict) -> str | None:
    """A schema's tool name (`{"type": "function", "function": {...}}` or the bare function part)."""
    inner = schema.get("function", schema) if isinstance(schema, dict) else None
    name = inner.get("name") if isinstance(inner, dict) else None
    return name if isinstance(name, str) and name else None
