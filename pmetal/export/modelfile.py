"""An Ollama Modelfile beside a GGUF: `FROM ./x.gguf`, the chat template as a Go template, stop tokens.

Ollama does not run the Jinja chat template a GGUF carries; it needs its own (Go `text/template`).
pmetal recognises the two common shapes, ChatML (SmolLM, Qwen) and Llama 3, by rendering the
tokenizer's template (`apply_chat_template`) on fixed conversations and comparing the text with
each shape's own rendering; a template of another shape (or one that adds text such as a date)
gets a Modelfile without TEMPLATE, and the export says so. A system prompt the template adds when
the conversation has none becomes the Modelfile's SYSTEM.

    ollama create my-model -f model.Modelfile
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class ChatShape:
    name: str
    render: Callable[[list[dict]], str]  # messages -> text, with the assistant's turn opened
    go_template: str
    stops: tuple[str, ...]


def _chatml(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _llama3(messages: list[dict]) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                    for m in messages)  # fmt: skip
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# Ollama passes the system prompt as .System and the other turns as .Messages.
CHATML_GO = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""
LLAMA3_GO = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
SHAPES = (ChatShape("ChatML", _chatml, CHATML_GO, ("<|im_end|>",)),
          ChatShape("Llama 3", _llama3, LLAMA3_GO, ("<|eot_id|>",)))  # fmt: skip

# Conversations the shape must reproduce: with a system prompt, multi-turn, and without one.
_SYSTEM = {"role": "system", "content": "You answer in one sentence."}
PROBES = (
    [_SYSTEM, {"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "What is 2+2?\nThink."}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
)  # fmt: skip


def _hf_render(tokenizer, messages: list[dict], shape: ChatShape) -> str:
    """The template's text for `messages`, less a leading BOS that the shape does not write
    (llama.cpp and Ollama add BOS themselves; SmolLM's BOS is `<|im_start|>`, which ChatML writes)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos, start = tokenizer.bos_token, shape.render([{"role": "user", "content": ""}])[:12]
    return text[len(bos) :] if bos and text.startswith(bos) and not text.startswith(start) else text


def default_system(tokenizer, shape: ChatShape) -> str | None:
    """The system prompt the template inserts when a conversation has none, if any."""
    user = [PROBES[1][0]]
    text, plain = _hf_render(tokenizer, user, shape), shape.render(user)
    if text == plain or not text.endswith(plain):
        return None
    marker = "\u0000system\u0000"
    head, _, tail = shape.render([{"role": "system", "content": marker}] + user).partition(marker)
    if not (text.startswith(head) and text.endswith(tail)):
        return None
    return text[len(head) : len(text) - len(tail)]


def chat_shape(tokenizer) -> tuple[ChatShape, str | None] | None:
    """The shape the tokenizer's chat template has (and its default system prompt), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for shape in SHAPES:
        try:
            system = default_system(tokenizer, shape)
            defaulted = [m if m[0]["role"] == "system" or system is None else [{"role": "system", "content": system}] + m
                         for m in PROBES]  # fmt: skip
            if all(_hf_render(tokenizer, m, shape) == shape.render(d) for m, d in zip(PROBES, defaulted)):
                return shape, system
        except Exception:  # a template that cannot render a probe conversation is not this shape
            continue
    return None


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(gguf_name: str, tokenizer) -> tuple[str, str | None]:
    """(the Modelfile, a note when its chat template could not be translated)."""
    lines = [f"FROM ./{gguf_name}"]
    found = chat_shape(tokenizer)
    if found is None:
        note = ("Modelfile: the chat template is neither ChatML nor Llama 3, so it has no TEMPLATE; add one "
                "in Ollama's Go template syntax (https://github.com/ollama/ollama/blob/main/docs/template.md)")
        return "\n".join(lines) + "\n", note if getattr(tokenizer, "chat_template", None) else (
            "Modelfile: the tokenizer has no chat template, so the Modelfile has no TEMPLATE")
    shape, system = found
    lines.append(f"TEMPLATE {_quoted(shape.go_template)}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in shape.stops]
    return "\n".join(lines) + "\n", None


def modelfile_path(gguf_path: str | Path) -> Path:
    """`x.gguf` -> `x.Modelfile` beside it."""
    path = Path(gguf_path)
    return path.with_name(path.stem + ".Modelfile")
