"""Image + text rows for vision-language models: messages with image parts -> ids, labels, pixels.

A row's images come from its `images`/`image` column (`pmetal.data.images`) or from the image
parts of its messages (`{"type": "image", "image": ...}`, OpenAI's `{"type": "image_url"}`).
Messages may carry `{"type": "image"}` parts where the images go; a row with images but no
parts gets them at the start of its first user message (as TRL does). A count of parts that
differs from the number of images is a `DataError` naming the row.

Rendering: the conversation is rendered as text by the chat template and the assistant spans are
found as for text (`pmetal.data.render.assistant_spans`); the processor then expands each image
placeholder into the image's tokens. Added tokens split the tokenization, so the text between
placeholders tokenizes identically before and after the expansion, and the loss mask carries over
token by token. Image tokens never carry a loss (not even with `train_on_prompt`). A row is cut
to `max_seq_len` only after its last image token (cutting an image would leave its features
without placeholders): a row whose images do not fit is a `DataError`.

Pixels are not kept in memory: a row keeps its image values, and the collator loads and
processes the images of each batch (`VlmCollator`, `pixel_inputs_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmetal.data.formats import row_error
from pmetal.data.images import base_dir, image_refs, load_image, load_row_images
from pmetal.data.render import IGNORE_INDEX, assistant_spans, render_text, _tokenize_with_spans
from pmetal.errors import PmetalError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "tool": "tool"}


@dataclass
class VlmRow:
    """One rendered image + text row (ids after the processor's image expansion)."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any]  # the image values as the row gave them (loaded again by the collator)
    root: str | None  # where relative image paths are resolved
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image's tokens
    truncated: bool = False

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "images": self.images, "root": self.root,
                "image_spans": self.image_spans}


def _part_image(part: dict) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)


def vlm_messages(rows: Sequence[dict], index: int, messages: Any, *, field_name: str = "messages",
                 path: str | None = None) -> tuple[list[dict], list[Any]]:
    """(messages ready for the template, the row's image values) of row `index`.

    Text parts are kept; image parts become `{"type": "image"}`; a message without images gets a
    plain string content, which every template renders.
    """
    _, column_images = image_refs(rows, index)
    if not isinstance(messages, list) or not messages:
        raise row_error(rows, index, "no conversation", field=field_name, expected="a list of {role, content}", path=path)
    out, part_images, parts = [], [], 0
    for k, turn in enumerate(messages):
        where = f"{field_name}[{k}]"
        if not isinstance(turn, dict):
            raise row_error(rows, index, "a message that is not an object", field=where, path=path,
                            expected='{"role": ..., "content": ...}')
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        if role is None:
            raise row_error(rows, index, f"unknown role {turn.get('role', turn.get('from'))!r}", field=where,
                            expected=", ".join(sorted(set(ROLES.values()))), path=path)
        content = turn.get("content", turn.get("value"))
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise row_error(rows, index, f"content is a {type(content).__name__}", field=f"{where}.content",
                            expected="a string or a list of {type: text|image} parts", path=path)
        new_parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                new_parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image", "image_url"):
                parts += 1
                value = _part_image(part)
                if value is not None:
                    part_images.append(value)
                new_parts.append({"type": "image"})
            else:
                raise row_error(rows, index, f"a content part of type {kind!r}", field=f"{where}.content[{j}]",
                                expected="{'type': 'text', 'text': ...} or {'type': 'image'}", path=path)
        if any(p["type"] == "image" for p in new_parts):
            out.append({"role": role, "content": new_parts})
        else:
            out.append({"role": role, "content": "".join(p["text"] for p in new_parts)})
    if column_images and part_images:
        raise row_error(rows, index, "images both in an image column and inside the messages", field=field_name,
                        expected="one place for the images", path=path)
    images = column_images or part_images
    if parts == 0 and images:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise row_error(rows, index, "images but no user message to attach them to", field=field_name, path=path)
        text = first_user["content"]
        first_user["content"] = [{"type": "image"} for _ in images] + ([{"type": "text", "text": text}] if text else [])
    elif parts != len(images):
        raise row_error(rows, index, f"{parts} image placeholder(s) in the messages but {len(images)} image(s)",
                        field=field_name, path=path,
                        expected="one {'type': 'image'} content part per image of the row")
    return out, images


def load_images(values: Sequence[Any], rows: Sequence[dict], index: int, *, root: Path | None,
                path: str | None = None, field_name: str = "images") -> list:
    return [load_image(v, root=root, rows=rows, index=index, field=f"{field_name}[{k}]", path=path)
            for k, v in enumerate(values)]


def _processor_call(processor, text: str, images: list):
    try:
        return processor(text=[text], images=[images] if images else None, return_tensors="pt")
    except PmetalError:
        raise
    except Exception as exc:  # the processor's own checks, e.g. placeholder/image count
        raise PmetalError(f"the processor rejected this row: {exc}") from None


def align_expanded(plain: Sequence[int], expanded: Sequence[int], image_id: int,
                   run_lengths: Sequence[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Map each token of `plain` (one placeholder per image) to its index in `expanded`.

    The text before the first image starts at 0 and the text after the last one ends at the end;
    `run_lengths` (tokens each image expands to, needed for two images or more) places the text
    between images: searching for it would be fooled by text inside an expansion (Idefics3's tiles
    are separated by newlines). Returns (index in `expanded` of each plain token, or -1 for
    placeholders; [start, end) of each image's expansion). Raises ValueError when the two do not
    line up.
    """
    holes = [k for k, t in enumerate(plain) if t == image_id]
    segments, start = [], 0
    for h in holes + [len(plain)]:
        segments.append(list(plain[start:h]))
        start = h + 1
    mapping = [-1] * len(plain)
    spans: list[tuple[int, int]] = []
    cursor, plain_at = 0, 0
    for s, seg in enumerate(segments):
        if s == 0:  # the text before the first image is unchanged
            at = 0
        elif s == len(segments) - 1:  # the text after the last image is anchored at the end
            at = len(expanded) - len(seg)
        elif run_lengths is not None:
            at = cursor + run_lengths[s - 1]
        else:
            raise ValueError("several images need their expansion lengths (run_lengths)")
        if at < cursor or list(expanded[at : at + len(seg)]) != seg:
            raise ValueError("the processor's expansion does not line up with the text")
        if s > 0:
            spans.append((cursor, at))
        for k in range(len(seg)):
            mapping[plain_at + k] = at + k
        cursor, plain_at = at + len(seg), plain_at + len(seg) + 1
    return mapping, spans


def render_vlm_row(processor, messages: list[dict], images: list, *, max_seq_len: int | None = None,
                   train_on_prompt: bool = False, generation_prompt: bool = False) -> tuple[list[int], list[int], list, bool, Any]:
    """(input_ids, labels, image spans, truncated, processor output) of one conversation with its loaded images.

    With `generation_prompt=True` the messages are a prompt (rendered with the assistant header,
    no labels).
    """
    from pmetal.vlm import image_token

    tokenizer = processor.tokenizer
    _, image_id = image_token(processor)
    if generation_prompt:
        full, spans = render_text(tokenizer, messages, add_generation_prompt=True), []
    else:
        full, spans, _ = assistant_spans(tokenizer, messages)
    plain, trained = _tokenize_with_spans(tokenizer, full, spans)
    if sum(1 for t in plain if t == image_id) != len(images):
        raise PmetalError(f"the chat template wrote {sum(1 for t in plain if t == image_id)} image placeholder(s) "
                          f"for {len(images)} image(s); does it render {{'type': 'image'}} content parts?")
    encoded = _processor_call(processor, full, images)
    expanded = encoded["input_ids"][0].tolist()
    runs = None
    if len(images) > 1:  # the text between two images is placed by the first one's expansion length
        token, _ = image_token(processor)
        runs = [len(_processor_call(processor, token, [image])["input_ids"][0]) for image in images]
    try:
        mapping, image_spans = align_expanded(plain, expanded, image_id, runs)
    except ValueError as exc:
        raise PmetalError(f"{exc}: the processor changed text outside the image placeholders") from None
    labels = [IGNORE_INDEX] * len(expanded)
    for k, at in enumerate(mapping):
        if at >= 0 and (trained[k] or train_on_prompt) and not generation_prompt:
            labels[at] = expanded[at]
    for start, end in image_spans:  # image tokens never carry a loss
        labels[start:end] = [IGNORE_INDEX] * (end - start)
    labels = [IGNORE_INDEX if t == image_id else x for t, x in zip(expanded, labels)]
    truncated = max_seq_len is not None and len(expanded) > max_seq_len
    if truncated:
        last_image = max((end for _, end in image_spans), default=0)
        if last_image > max_seq_len:
            raise PmetalError(f"the row's images end at token {last_image}, beyond max_seq_len={max_seq_len} "
                              "(an image cannot be cut); raise max_seq_len or use smaller images")
        expanded, labels = expanded[:max_seq_len], labels[:max_seq_len]
    return expanded, labels, image_spans, truncated, encoded


def render_vlm_example(processor, rows: Sequence[dict], index: int, messages: Any, *, path: str | None,
                       max_seq_len: int | None, train_on_prompt: bool = False, field_name: str = "messages",
                       generation_prompt: bool = False) -> VlmRow:
    """Render row `index` of a VLM dataset; every error names the file and row."""
    messages, values = vlm_messages(rows, index, messages, field_name=field_name, path=path)
    root = base_dir(path)
    if image_refs(rows, index)[0] is not None:  # errors name the image column (`image`, `images[1]`)
        images = load_row_images(rows, index, path=path, root=root)
    else:  # images given inside the message parts
        images = load_images(values, rows, index, root=root, path=path, field_name=f"{field_name} images")
    try:
        ids, labels, spans, truncated, _ = render_vlm_row(processor, messages, images, max_seq_len=max_seq_len,
                                                          train_on_prompt=train_on_prompt,
                                                          generation_prompt=generation_prompt)
    except PmetalError as exc:
        raise row_error(rows, index, str(exc), field=field_name, path=path) from None
    return VlmRow(ids, labels, values, str(root) if root else None, spans, truncated)


def pixel_inputs_of(processor, images: Sequence[Any], root: str | None) -> dict:
    """The pixel inputs (image tensors, batch of one row) of a row's image values; {} without images."""
    if not images:
        return {}
    root_path = Path(root) if root else None
    loaded = [load_image(v, root=root_path, rows=[{}], index=0, field=f"images[{k}]", path=root)
              for k, v in enumerate(images)]
    out = processor.image_processor(images=[loaded], return_tensors="pt")
    return {k: v for k, v in dict(out).items() if hasattr(v, "shape") and k not in ("rows", "cols")}


def vlm_processor(datamodule: Any):
    """The processor of a VLM run: the datamodule's own, else its Trainer's LightningModule's (or None)."""
    processor = getattr(datamodule, "processor", None)
    trainer = getattr(datamodule, "trainer", None)
    if processor is None and trainer is not None:
        processor = getattr(trainer.lightning_module, "processor", None)
    return processor


class VlmCollator:
    """Pads rows like `PaddingCollator` (no packing: each row keeps its images and positions) and adds
    `pixel_inputs`, the batch's image tensors."""

    def __init__(self, processor, pad_token_id: int, pad_to_multiple_of: int = 1, max_length: int | None = None):
        from pmetal.data.collate import PaddingCollator

        self.processor = processor
        self.pad = PaddingCollator(pad_token_id, pad_to_multiple_of, max_length)

    def __call__(self, rows: Sequence[dict]) -> dict:
        from pmetal.vlm import collate_pixel_inputs

        batch = self.pad(rows)
        pixels = collate_pixel_inputs([pixel_inputs_of(self.processor, r["images"], r["root"]) for r in rows])
        if pixels:
            batch["pixel_inputs"] = pixels
        return batch


# ---------------------------------------------------------------------------------------------- datasets
def _row_conversation(rows: Sequence[dict], index: int, *, fmt: str | None, prompt_column, response_column,
                      system_prompt, path) -> tuple[Any, str]:
    """(raw messages of row `index`, the field they came from): `messages`/`conversations` as written
    (image parts allowed), any other SFT layout through `formats.to_sft_examples`."""
    row = rows[index]
    for name in ("messages", "conversations"):
        if isinstance(row.get(name), list) and not prompt_column:
            messages = list(row[name])
            if system_prompt and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": system_prompt})
            return messages, name
    from pmetal.data.formats import to_sft_examples

    text_row = {k: v for k, v in row.items() if k not in ("image", "images")}
    _, (example,) = to_sft_examples([text_row], fmt=fmt, prompt_column=prompt_column, response_column=response_column,
                                    system_prompt=system_prompt, path=path)
    if example.messages is None:
        raise row_error(rows, index, "a plain-text row in a VLM dataset", expected="messages with images", path=path)
    return example.messages, fmt or "messages"


def render_vlm_dataset(processor, rows: Sequence[dict], *, path: str | None, max_seq_len: int | None,
                       train_on_prompt: bool = False, prompt_column: str | None = None,
                       response_column: str | None = None, system_prompt: str | None = None,
                       chat_template: str | None = None):
    """Render every row of an image + text SFT file: (RenderedDataset with VLM rows, format name)."""
    from pmetal.data.formats import detect_format
    from pmetal.data.render import RenderedDataset, ensure_chat_template

    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    ensure_chat_template(tokenizer, chat_template)
    first = {k: v for k, v in rows[0].items() if k not in ("image", "images")} if rows else {}
    has_messages = any(isinstance(rows[0].get(n), list) for n in ("messages", "conversations")) if rows else False
    fmt = None if has_messages or not rows else detect_format([first], prompt_column=prompt_column)
    out, source, truncated, dropped = [], [], 0, []
    for i in range(len(rows)):
        messages, field_name = _row_conversation(rows, i, fmt=fmt, prompt_column=prompt_column,
                                                 response_column=response_column, system_prompt=system_prompt, path=path)
        row = render_vlm_example(processor, rows, i, messages, path=path, max_seq_len=max_seq_len,
                                 train_on_prompt=train_on_prompt, field_name=field_name)
        truncated += row.truncated
        if all(x == IGNORE_INDEX for x in row.labels):
            dropped.append(i)
            continue
        out.append(row.as_dict())
        source.append(i)
    return RenderedDataset(out, source, truncated, dropped), (fmt or "messages") + "+images"


def image_summary_lines(rendered, max_examples: int = 3) -> list[str]:
    """`pmetal dataset validate` lines: images per row, tokens per image, and where the first ones sit."""
    spans = [(k, s) for k, r in enumerate(rendered.rows) for s in r.get("image_spans", [])]
    if not spans:
        return ["images:      none"]
    sizes = sorted(end - start for _, (start, end) in spans)
    rows_with = len({k for k, _ in spans})
    lines = [f"images:      {len(spans)} in {rows_with} rows; image tokens per image: min {sizes[0]}  "
             f"mean {sum(sizes) / len(sizes):.1f}  max {sizes[-1]} (never in the loss)"]
    for k, r in enumerate(rendered.rows[:max_examples]):
        where = ", ".join(f"image {j}: tokens {s}-{e - 1} ({e - s})" for j, (s, e) in enumerate(r.get("image_spans", [])))
        if where:
            lines.append(f"  row {rendered.source[k] + 1}: {len(r['input_ids'])} tokens; {where}")
    return lines


def vlm_prompt_item(processor, rows: Sequence[dict], index: int, messages: list[dict], *, path: str | None,
                    max_prompt_length: int) -> tuple[dict, bool]:
    """(the prompt item of row `index` for RL: ids with expanded images, image values; whether it was cut)."""
    row = render_vlm_example(processor, rows, index, messages, path=path, max_seq_len=None, generation_prompt=True)
    ids, truncated = row.input_ids, len(row.input_ids) > max_prompt_length
    if truncated:
        first_image = min((s for s, _ in row.image_spans), default=len(ids))
        if len(ids) - max_prompt_length > first_image:
            raise row_error(rows, index, f"the prompt needs {len(ids)} tokens with its images, more than "
                            f"max_prompt_length={max_prompt_length}, and an image cannot be cut",
                            expected="a larger max_prompt_length or smaller images", path=path)
        ids = ids[len(ids) - max_prompt_length :]
    return {"prompt_ids": ids, "images": row.images, "root": row.root}, truncated


def inspect_vlm_file(args):
    """(`SftFileReport` of an image + text file rendered without truncation, tokenizer) for `pmetal dataset`."""
    from pmetal.data.formats import load_rows
    from pmetal.data.inspect import SftFileReport
    from pmetal.models import resolve_model
    from pmetal.vlm import load_processor

    processor = load_processor(resolve_model(args.model)[0])
    rows = load_rows(args.file)
    rendered, fmt = render_vlm_dataset(processor, rows, path=args.file, max_seq_len=None,
                                       train_on_prompt=args.train_on_prompt, prompt_column=args.prompt_column,
                                       response_column=args.response_column, system_prompt=args.system_prompt,
                                       chat_template=args.chat_template)
    return SftFileReport(args.file, fmt, rows, rendered, args.max_seq_len), processor.tokenizer
