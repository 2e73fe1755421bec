"""The text side of serving: prompts from OpenAI messages (tools included), completions' text as
tokens arrive (stop strings), and tool calls parsed from a reply.

Tool calls use one format, the one pmetal's agent training writes: the model answers a call as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

(one block per call, any text around them is the reply's content). A chat template that takes
`tools` (Qwen2.5/3, Llama 3.1, Hermes-style templates) gets them as they are and already asks for
this format; a template without tools (SmolLM2's) gets them described in the system message, with
the instruction to answer in this format. Earlier calls (assistant `tool_calls`) and results
(`tool` messages) are written back in the same tags (`<tool_response>` for results) for templates
that do not render them themselves.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_CALL_OPEN = "<tool_call>"


def template_takes_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def tools_system_text(tools: Sequence[dict]) -> str:
    """The system-message description of `tools` for a template that cannot take them."""
    listed = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    return ("You may call these tools:\n" + listed + "\nTo call one, answer with "
            '<tool_call>{"name": <tool name>, "arguments": <arguments object>}</tool_call> '
            "(one block per call).")


def plain_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI messages as `{"role", "content"}` text turns for a template that knows no tool roles."""
    out = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        role = m["role"]
        if role == "developer":
            role = "system"
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            arguments = fn.get("arguments", "{}")
            arguments = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else arguments
            content += f'<tool_call>{json.dumps({"name": fn.get("name"), "arguments": arguments})}</tool_call>'
        if role == "tool":
            role, content = "user", f"<tool_response>{content}</tool_response>"
        out.append({"role": role, "content": content})
    return out


def chat_prompt_ids(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of the conversation ending with the assistant header (PmetalError if the template refuses it)."""
    from pmetal.data.render import render_prompt, render_text
    from pmetal.errors import PmetalError

    if tools and template_takes_tools(tokenizer):
        try:
            text = tokenizer.apply_chat_template(list(messages), tools=list(tools), tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's errors become one line for the client
            raise PmetalError(f"the chat template rejected this conversation: {e}") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    turns = plain_messages(messages)
    if tools:
        described = tools_system_text(tools)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + described}
        else:
            turns.insert(0, {"role": "system", "content": described})
    render_text(tokenizer, turns, add_generation_prompt=True)  # its errors are PmetalErrors
    return render_prompt(tokenizer, turns)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """`(content, tool_calls)` of a reply: each valid `<tool_call>{json}</tool_call>` block becomes an
    OpenAI tool call (arguments as a JSON string); a block that is not a JSON object with a `name`
    stays in the content."""
    calls, kept, cursor = [], [], 0
    for match in TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        kept.append(text[cursor: match.start()])
        cursor = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    kept.append(text[cursor:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


class RowText:
    """One completion's text as its tokens arrive.

    The whole completion is decoded each time (decoding tokens one by one splits multi-byte
    characters and drops the spaces some tokenizers attach to the next token). `ready()` is the
    text safe to send: it stops short of a partial character, of anything that could still become
    a stop string, and (with tools) of a `<tool_call>` block, which is parsed at the end instead.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), hold_tool_calls: bool = False) -> None:
        self.tokenizer, self.stop, self.hold_tool_calls = tokenizer, [s for s in stop if s], hold_tool_calls
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.hit_stop = False

    def add(self, ids: Sequence[int]) -> None:
        """Append token ids; sets `hit_stop` (and cuts the text) when a stop string appears."""
        self.ids += ids
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.hit_stop = self.text[:at], True

    def ready(self, final: bool = False) -> str:
        """The text not sent yet that can be sent now (all of it once `final`)."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            markers = self.stop + ([TOOL_CALL_OPEN] if self.hold_tool_calls else [])
            end = min([end] + [_partial_at(self.text, m) for m in markers])
        if self.hold_tool_calls and not (final and not parse_tool_calls(self.text)[1]):
            at = self.text.find(TOOL_CALL_OPEN)
            end = min(end, at) if at >= 0 else end
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent: end], end
        return piece


def _partial_at(text: str, marker: str) -> int:
    """Where a suffix of `text` that begins `marker` starts (len(text) if none does)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)
