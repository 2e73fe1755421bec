"""The text side of serving: prompts from OpenAI messages (tools included), completions' text as
tokens arrive (stop strings), and tool calls parsed from a reply.

Tool calls use one format, the one pmetal's agent training writes and its rollouts parse:
`pmetal.tools.format` (its docstring states it); this module only applies it to requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from pmetal.tools.format import TOOL_CALL_OPEN, parse_tool_calls, template_takes_tools  # noqa: F401 - serve's API


def chat_prompt_ids(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of the conversation ending with the assistant header (PmetalError if the template refuses it)."""
    from pmetal.data.render import render_prompt

    return render_prompt(tokenizer, messages, tools=tools)


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
