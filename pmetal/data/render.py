"""Chat template -> `input_ids` + `labels` with the loss on assistant tokens only.

How the mask is found (works with any Jinja chat template, no `{% generation %}` block needed):
the conversation is rendered as text once in full, and for every assistant message `i` twice more,
as `messages[:i]` with the generation prompt (P_i) and as `messages[:i+1]` (F_i). When P_i is a
prefix of F_i and F_i a prefix of the full text, the characters `[len(P_i), len(F_i))` are that
assistant turn: its content plus the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, EOS...). Scaffolding after the end-of-turn token (ChatML's trailing newline) is
not trained, since generation stops at that token. The full text is tokenized once and a token is
trained when it overlaps an assistant span (character offsets from the fast
tokenizer; slow tokenizers are tokenized span by span). Everything else - system prompt, user
turns, role headers - gets label -100.

A turn whose prefix property fails (templates that rewrite history, e.g. dropping earlier
reasoning) is left untrained rather than trained on text the model would never see.

Helpers for the other builders (preference, KTO, RL):
- `render_prompt(tokenizer, messages)`: the prompt ids a model generates from.
- `render_prompt_completion(tokenizer, prompt, completion, max_seq_len)`: prompt ids followed by
  the completion's ids (incl. end-of-turn), labels on the completion only, prompt truncated first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmetal.data.formats import SftExample
from pmetal.errors import PmetalError
from pmetal.tokens import END_OF_TURN_TOKENS, IGNORE_INDEX


# The fallback template picked explicitly with chat_template="chatml" for models that ship none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class NoChatTemplateError(PmetalError):
    """The tokenizer has no chat template and conversations must be rendered."""


@dataclass
class RenderedRow:
    """One tokenized training row.

    Attributes:
        input_ids: token ids, at most `max_seq_len` long.
        labels: same length; the token id where the loss applies, -100 elsewhere.
        truncated: the row was longer than `max_seq_len` and was cut.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        """How many tokens carry a loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def ensure_chat_template(tokenizer: Any, chat_template: str | None = None) -> None:
    """Make sure `tokenizer` can render conversations, installing an explicit template if given.

    Args:
        tokenizer: a Hugging Face tokenizer (modified in place when `chat_template` is given).
        chat_template: None keeps the model's own template; "chatml" installs the generic ChatML
            template (`<|im_start|>role\\n...<|im_end|>`; if the model lacks these special tokens
            they are learned as plain text); any other value is a Jinja template string or the path
            of a `.jinja` file.

    Raises:
        PmetalError: the tokenizer has no chat template and none was chosen.
    """
    if chat_template is not None:
        if chat_template == "chatml":
            tokenizer.chat_template = CHATML_TEMPLATE
        elif "{{" in chat_template or "{%" in chat_template:
            tokenizer.chat_template = chat_template
        elif Path(chat_template).expanduser().is_file():
            tokenizer.chat_template = Path(chat_template).expanduser().read_text(encoding="utf-8")
        else:
            raise PmetalError(f"chat_template={chat_template!r} is neither 'chatml', a Jinja template, "
                              "nor an existing template file")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise NoChatTemplateError(f"the tokenizer of {name} has no chat template, and this dataset is made of "
                          "conversations. Pass chat_template='chatml' (--data.chat_template chatml) to "
                          "use the generic ChatML template, or give rows with a plain 'text' field.")


def end_of_turn_markers(tokenizer: Any) -> list[str]:
    """The strings that close an assistant turn for this tokenizer's template (EOS first).

    Only the `END_OF_TURN_TOKENS` present in the template are used, so ordinary text never matches
    by accident; EOS is always added.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    markers = [m for m in END_OF_TURN_TOKENS if m in template]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in markers:
        markers.insert(0, eos)
    return markers


def render_text(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool = False,
                tools: Sequence[dict] | None = None) -> str:
    """The chat template applied to `messages`, as text (template errors become `PmetalError`).

    A conversation with tools (`tools` schemas, assistant `tool_calls`, `tool` messages) goes to a
    template that takes tools as it is, else in the fallback format of `pmetal.tools.format`.
    """
    from pmetal.tools.format import template_inputs, uses_tools

    extra = {}
    if uses_tools(messages, tools):
        messages, template_tools = template_inputs(tokenizer, messages, tools)
        if template_tools:
            extra["tools"] = template_tools
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
    except Exception as e:  # jinja2 raises TemplateError for e.g. "roles must alternate"
        if not getattr(tokenizer, "chat_template", None):
            ensure_chat_template(tokenizer)
        raise PmetalError(f"the chat template rejected this conversation: {e}") from None
    return text


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _trim_after_end_of_turn(text: str, markers: Sequence[str]) -> int | None:
    """Length of `text` up to and including its last end-of-turn marker, or None if it has none."""
    best = None
    for marker in markers:
        at = text.rfind(marker)
        if at >= 0 and (best is None or at + len(marker) > best):
            best = at + len(marker)
    return best


def assistant_spans(tokenizer: Any, messages: Sequence[dict],
                    tools: Sequence[dict] | None = None) -> tuple[str, list[tuple[int, int]], int]:
    """Character spans of every assistant turn (content + end-of-turn) in the rendered conversation
    (`tools`: the row's tool schemas; tool results are never assistant turns, so never trained).

    Returns:
        (full text, [(start, end)] spans in order, number of assistant turns that could not be
        located because the template is not prefix-stable for them).
    """
    full = render_text(tokenizer, messages, tools=tools)
    markers = end_of_turn_markers(tokenizer)
    spans, skipped = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:  # some templates cannot render an empty conversation (an assistant-first row)
            prompt = render_text(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        except PmetalError:
            skipped += 1
            continue
        turn = render_text(tokenizer, messages[: i + 1], tools=tools)
        if not (turn.startswith(prompt) and full.startswith(turn)) or len(turn) == len(prompt):
            skipped += 1
            continue
        end = _trim_after_end_of_turn(turn[len(prompt):], markers)
        spans.append((len(prompt), len(prompt) + end if end is not None else len(turn)))
    return full, spans, skipped


def render_messages(tokenizer: Any, messages: Sequence[dict], *, max_seq_len: int | None = None,
                    train_on_prompt: bool = False, tools: Sequence[dict] | None = None) -> RenderedRow:
    """Tokenize a conversation with the chat template; labels on assistant turns only.

    Args:
        tokenizer: a tokenizer with a chat template (see `ensure_chat_template`).
        messages: `[{"role", "content"}]` with at least one assistant message.
        max_seq_len: cut the row to this many tokens (the end is dropped).
        train_on_prompt: put the loss on every token (system, user and scaffolding too).
        tools: the row's tool schemas (see `render_text`).

    Returns:
        a `RenderedRow`; the EOS id is appended (and trained) when the template closes the last
        assistant turn with nothing at all.
    """
    full, spans, _ = assistant_spans(tokenizer, messages, tools)
    input_ids, trained = _tokenize_with_spans(tokenizer, full, spans)
    if spans and spans[-1][1] == len(full) and _trim_after_end_of_turn(full[spans[-1][0]:],
                                                                       end_of_turn_markers(tokenizer)) is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            input_ids.append(eos)
            trained.append(True)
    labels = [t if (train or train_on_prompt) else IGNORE_INDEX for t, train in zip(input_ids, trained)]
    return _truncate(input_ids, labels, max_seq_len)


def _tokenize_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
    if offsets is not None:
        ids = list(enc["input_ids"])
        trained, k = [], 0
        for start, end in offsets:
            end = max(end, start + 1)
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            # A token overlapping a span is trained: BPE may merge a template's trailing space into
            # the first answer token (" Hello"), which is still the token the model must produce.
            trained.append(k < len(spans) and start < spans[k][1] and end > spans[k][0])
        return ids, trained
    # A slow tokenizer: tokenize the masked and trained pieces one by one.
    ids, trained, cursor = [], [], 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, train in ((text[cursor:start], False), (text[start:end], True)):
            if piece:
                piece_ids = _tokenize(tokenizer, piece)
                ids += piece_ids
                trained += [train] * len(piece_ids)
        cursor = end
    return ids, trained


def _truncate(input_ids: list[int], labels: list[int], max_seq_len: int | None) -> RenderedRow:
    if max_seq_len is not None and len(input_ids) > max_seq_len:
        return RenderedRow(input_ids[:max_seq_len], labels[:max_seq_len], truncated=True)
    return RenderedRow(input_ids, labels, truncated=False)


def render_plain_text(tokenizer: Any, text: str, *, max_seq_len: int | None = None) -> RenderedRow:
    """Tokenize a raw `text` row (no template): the tokenizer's own BOS, then EOS; loss on all."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return _truncate(ids, list(ids), max_seq_len)


def render_example(tokenizer: Any, example: SftExample, *, max_seq_len: int | None = None,
                   train_on_prompt: bool = False) -> RenderedRow:
    """Render one normalized SFT example (`formats.SftExample`): messages or plain text."""
    if example.text is not None:
        return render_plain_text(tokenizer, example.text, max_seq_len=max_seq_len)
    return render_messages(tokenizer, example.messages, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt,
                           tools=example.tools)


def render_prompt(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool = True,
                  tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of a prompt conversation, ending with the assistant header the model continues from.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: `[{"role", "content"}]`, usually system/user turns.
        add_generation_prompt: append the template's "assistant starts here" header.
        tools: tool schemas offered to the model (see `render_text`).

    Returns:
        the ids exactly as a generator would be fed them (no extra BOS beyond the template's).
    """
    return _tokenize(tokenizer, render_text(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                            tools=tools))


def render_prompt_completion(
    tokenizer: Any,
    prompt_messages: Sequence[dict],
    completion: str | dict | Sequence[dict],
    max_seq_len: int | None = None,
    keep: str = "prompt_tail",
) -> tuple[list[int], list[int], bool]:
    """Prompt ids followed by one assistant completion, with the loss on the completion only.

    The prompt is `render_prompt(tokenizer, prompt_messages)`; the completion tokens are what the
    template adds for the final assistant turn, up to and including its end-of-turn token (EOS is
    appended when the template closes the turn with nothing). Both are tokenized separately, so the
    prompt ids are identical for a chosen and a rejected completion and to what generation sees.

    Args:
        tokenizer: a tokenizer with a chat template.
        prompt_messages: the conversation before the answer.
        completion: the answer: a string, an `{"role": "assistant", "content"}` dict, or a list
            holding one such message.
        max_seq_len: the most tokens to return (None: no limit).
        keep: how to truncate. "prompt_tail": drop the start of the prompt first (keeping at least
            half of `max_seq_len` for it when the completion is long), then the end of the
            completion. "start": keep the beginning and drop the end.

    Returns:
        (input_ids, labels with -100 on prompt tokens, truncated).

    Raises:
        PmetalError: the template renders the prompt differently once an answer follows it, or
            `keep` is unknown.
    """
    if keep not in ("prompt_tail", "start"):
        raise PmetalError(f"keep={keep!r} is not one of 'prompt_tail', 'start'")
    if isinstance(completion, str):
        completion = {"role": "assistant", "content": completion}
    if isinstance(completion, dict):
        completion = [completion]
    prompt_text = render_text(tokenizer, prompt_messages, add_generation_prompt=True)
    full_text = render_text(tokenizer, list(prompt_messages) + list(completion))
    if not full_text.startswith(prompt_text):
        raise PmetalError("the chat template renders the prompt differently when an answer follows it, "
                          "so the completion cannot be separated from the prompt")
    completion_text = full_text[len(prompt_text):]
    end = _trim_after_end_of_turn(completion_text, end_of_turn_markers(tokenizer))
    completion_ids = _tokenize(tokenizer, completion_text[:end] if end is not None else completion_text)
    if end is None and getattr(tokenizer, "eos_token_id", None) is not None:
        completion_ids.append(tokenizer.eos_token_id)
    prompt_ids = _tokenize(tokenizer, prompt_text)
    return _truncate_prompt_completion(prompt_ids, completion_ids, max_seq_len, keep)


def render_raw_prompt_completion(tokenizer: Any, prompt: str, completion: str, max_seq_len: int | None = None,
                                 keep: str = "prompt_tail") -> tuple[list[int], list[int], bool]:
    """Tokenize a plain-text prompt and completion as raw text, without a chat template, as TRL does.

    The text is `prompt + completion + EOS` (EOS unless the completion ends with it), tokenized with
    the tokenizer's special tokens (a BOS where the tokenizer adds one); the completion starts where
    the tokens of the prompt alone and of the whole text first differ (a token merging across the
    boundary belongs to the completion). Truncation and the return value as in
    `render_prompt_completion`.
    """
    if keep not in ("prompt_tail", "start"):
        raise PmetalError(f"keep={keep!r} is not one of 'prompt_tail', 'start'")
    eos = getattr(tokenizer, "eos_token", None)
    text = prompt + (completion if not eos or completion.endswith(eos) else completion + eos)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    full_ids = list(tokenizer(text)["input_ids"])
    start = next((k for k, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids)))
    return _truncate_prompt_completion(full_ids[:start], full_ids[start:], max_seq_len, keep)


def _truncate_prompt_completion(prompt_ids: list[int], completion_ids: list[int], max_seq_len: int | None,
                                keep: str) -> tuple[list[int], list[int], bool]:
    truncated = max_seq_len is not None and len(prompt_ids) + len(completion_ids) > max_seq_len
    if truncated:
        if keep == "prompt_tail":
            keep_prompt = min(len(prompt_ids), max(max_seq_len - len(completion_ids), max_seq_len // 2))
            prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
        else:
            prompt_ids = prompt_ids[:max_seq_len]
        completion_ids = completion_ids[: max_seq_len - len(prompt_ids)]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return input_ids, labels, truncated


@dataclass
class RenderedDataset:
    """A tokenized SFT file.

    Attributes:
        rows: `{"input_ids", "labels"}` dicts (lists of ints), rows without trained tokens removed.
        source: for each kept row, its index in the input rows (for locating it in the file).
        truncated: how many rows were cut to `max_seq_len`.
        dropped: indices of input rows left with no trained token (e.g. the answer was truncated
            away), which are not trained on.
        assistant_first: indices of rows whose conversation opens with an assistant message; that
            message has no prompt to answer, so it carries no loss.
    """

    rows: list[dict[str, list[int]]]
    source: list[int]
    truncated: int
    dropped: list[int]
    assistant_first: list[int] = field(default_factory=list)

    def lengths(self) -> list[int]:
        return [len(r["input_ids"]) for r in self.rows]

    def trained_tokens(self) -> int:
        return sum(1 for r in self.rows for x in r["labels"] if x != IGNORE_INDEX)


def render_sft_dataset(tokenizer: Any, rows: Sequence[dict], examples: Sequence[SftExample], *,
                       max_seq_len: int | None = None, train_on_prompt: bool = False,
                       path: str | None = None) -> RenderedDataset:
    """Render every normalized example of a file (see `formats.to_sft_examples`).

    Raises:
        DataError: the chat template rejects a row (the error names the file and row).
    """
    from pmetal.data.formats import row_error

    out, source, truncated, dropped = [], [], 0, []
    assistant_first = [i for i, e in enumerate(examples) if opens_with_assistant(e.messages)]
    for i, example in enumerate(examples):
        try:
            rendered = render_example(tokenizer, example, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt)
        except NoChatTemplateError:
            raise
        except PmetalError as e:
            raise row_error(rows, i, str(e), field="messages", path=path) from None
        truncated += rendered.truncated
        if rendered.num_trained == 0:
            dropped.append(i)
            continue
        out.append({"input_ids": rendered.input_ids, "labels": rendered.labels})
        source.append(i)
    return RenderedDataset(out, source, truncated, dropped, assistant_first)


def opens_with_assistant(messages: Sequence[dict] | None) -> bool:
    """The first message after any system message is the assistant's (two user turns in a row are fine)."""
    roles = [m.get("role") for m in messages or () if m.get("role") != "system"]
    return bool(roles) and roles[0] == "assistant"


def datamodule_tokenizer(datamodule: Any) -> Any:
    """The tokenizer a DataModule renders with: its own, else its Trainer's LightningModule's.

    Raises a `PmetalError` naming the DataModule when there is neither.
    """
    tokenizer = getattr(datamodule, "tokenizer", None)
    trainer = getattr(datamodule, "trainer", None)
    if tokenizer is None and trainer is not None:
        tokenizer = getattr(trainer.lightning_module, "tokenizer", None)
    if tokenizer is None:
        raise PmetalError(f"{type(datamodule).__name__} needs a tokenizer: pass tokenizer=... or train a module that "
                          "has a `tokenizer` attribute")
    return tokenizer
