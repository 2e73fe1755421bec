"""Image rows: the forms an image may take, errors naming file/row/image, rendering, masks, batching."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from pmetal.data.images import load_row_images
from pmetal.errors import DataError, PmetalError

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_image_form_loads(colour_images):
    from PIL import Image

    png = (colour_images / "red.png").read_bytes()
    b64 = base64.b64encode(png).decode()
    rows = [
        {"image": "red.png"},
        {"images": ["red.png", str(colour_images / "blue.png")]},
        {"image": f"data:image/png;base64,{b64}"},
        {"image": b64},
        {"image": {"bytes": png, "path": None}},
        {"image": {"bytes": None, "path": str(colour_images / "green.png")}},
        {"image": Image.open(colour_images / "red.png")},
    ]
    path = str(colour_images / "data.jsonl")
    counts = [len(load_row_images(rows, i, path=path)) for i in range(len(rows))]
    assert counts == [1, 2, 1, 1, 1, 1, 1]
    red = load_row_images(rows, 0, path=path)[0]
    assert red.mode == "RGB" and red.getpixel((16, 16)) == (220, 30, 30)
    assert load_row_images(rows, 2, path=path)[0].getpixel((16, 16)) == (220, 30, 30)
    assert load_row_images([{"text": "no image"}], 0, path=path) == []


def test_missing_and_corrupt_images_name_file_row_and_index(colour_images, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    path = str(tmp_path / "d.jsonl")
    rows = [{"images": ["ok.png"]}, {"images": [str(colour_images / "red.png"), "missing.png"]}]
    with pytest.raises(DataError, match=r"d\.jsonl, row 2, field 'images\[1\]'.*image file not found: .*missing\.png"):
        load_row_images(rows, 1, path=path)
    with pytest.raises(DataError, match=r"row 1, field 'image'.*bad\.png is corrupt or not an image"):
        load_row_images([{"image": "bad.png"}], 0, path=path)
    with pytest.raises(DataError, match="data URI whose payload is not valid base64"):
        load_row_images([{"image": "data:image/png;base64,@@@"}], 0, path=path)
    with pytest.raises(DataError, match="an image given as int"):
        load_row_images([{"image": 3}], 0, path=path)


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_render_masks_images_and_prompt(family, tiny_vlm_dirs, colour_images):
    from pmetal.data.render import IGNORE_INDEX
    from pmetal.data.vlm import render_vlm_dataset
    from pmetal.vlm import image_token, load_processor

    processor = load_processor(str(tiny_vlm_dirs[family]))
    _, image_id = image_token(processor)
    rows = [{"images": ["red.png", "blue.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": "red, blue"}]},
        {"image": "green.png", "messages": [{"role": "user", "content": "Colour?"},  # no part: image goes first
                                             {"role": "assistant", "content": "green"}]}]
    rendered, fmt = render_vlm_dataset(processor, rows, path=str(colour_images / "d.jsonl"), max_seq_len=512,
                                       train_on_prompt=True)
    assert fmt == "messages+images"
    tokenizer = processor.tokenizer
    for row, n_images in zip(rendered.rows, (2, 1)):
        ids, labels = row["input_ids"], row["labels"]
        assert len(row["image_spans"]) == n_images
        image_positions = {k for s, e in row["image_spans"] for k in range(s, e)}
        assert {k for k, t in enumerate(ids) if t == image_id} <= image_positions  # every image token in a span
        assert all(labels[k] == IGNORE_INDEX for k in image_positions)  # never trained, even on the prompt
        assert all(labels[k] == ids[k] for k in range(len(ids)) if k not in image_positions)  # train_on_prompt
    rendered, _ = render_vlm_dataset(processor, rows, path=str(colour_images / "d.jsonl"), max_seq_len=512)
    trained = [tokenizer.decode([t for t in r["labels"] if t != IGNORE_INDEX]) for r in rendered.rows]
    assert trained[0].startswith("red, blue") and trained[1].startswith("green")
    first_span = rendered.rows[1]["image_spans"][0]
    assert tokenizer.decode(rendered.rows[1]["input_ids"][first_span[1]:]).lstrip().startswith(
        ("Colour?", "<fake_token_around_image>Colour?", "<|vision_end|>Colour?"))


def test_placeholder_count_and_cut_images_are_row_errors(tiny_vlm_dirs, colour_images):
    from pmetal.data.vlm import render_vlm_dataset
    from pmetal.vlm import load_processor

    processor = load_processor(str(tiny_vlm_dirs["idefics3"]))
    path = str(colour_images / "d.jsonl")
    two_parts = [{"image": "red.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "red"}]}]
    with pytest.raises(DataError, match=r"row 1, field 'messages': 2 image placeholder\(s\) in the messages but 1 image"):
        render_vlm_dataset(processor, two_parts, path=path, max_seq_len=512)
    one = [{"image": "red.png", "messages": [USER, {"role": "assistant", "content": "red"}]}]
    with pytest.raises(DataError, match="row 1.*an image cannot be cut"):
        render_vlm_dataset(processor, one, path=path, max_seq_len=4)
    missing = [one[0], {"image": "nope.png", "messages": one[0]["messages"]}]
    with pytest.raises(DataError, match=r"row 2, field 'image'.*nope\.png"):
        render_vlm_dataset(processor, missing, path=path, max_seq_len=512)


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_collate_pads_rows_and_stacks_pixels(family, tiny_vlm_dirs, colour_images):
    from pmetal.data.vlm import VlmCollator, render_vlm_dataset
    from pmetal.vlm import load_processor

    processor = load_processor(str(tiny_vlm_dirs[family]))
    rows = [{"images": ["red.png", "blue.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}]}, {"role": "assistant", "content": "x"}]},
        {"image": "green.png", "messages": [USER, {"role": "assistant", "content": "green is the answer"}]},
        {"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "ok"}]}]
    rendered, _ = render_vlm_dataset(processor, rows, path=str(colour_images / "d.jsonl"), max_seq_len=512)
    batch = VlmCollator(processor, pad_token_id=0)(rendered.rows)
    lengths = [len(r["input_ids"]) for r in rendered.rows]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    pixels = batch["pixel_inputs"]
    if family == "qwen2_vl":
        assert pixels["image_grid_thw"].shape[0] == 3  # three images, concatenated in row order
        assert pixels["pixel_values"].shape[0] == int(pixels["image_grid_thw"].prod(-1).sum())
    else:
        assert pixels["pixel_values"].shape[:2] == (3, 2)  # rows x most images, padded with empty images
        assert torch.count_nonzero(pixels["pixel_values"][1, 1]) == 0 and torch.count_nonzero(pixels["pixel_values"][2]) == 0


def test_dataset_validate_shows_image_tokens(tiny_vlm_dirs, colour_images, capsys):
    from pmetal.cli import main

    path = _jsonl(colour_images / "v.jsonl", [{"image": c, "messages": [USER, {"role": "assistant", "content": c}]}
                                               for c in ("red.png", "green.png")])
    assert main(["dataset", "validate", path, "--model", str(tiny_vlm_dirs["qwen2_vl"])]) == 0
    out = capsys.readouterr().out
    assert "images:      2 in 2 rows; image tokens per image: min 4  mean 4.0  max 4" in out
    assert "row 1:" in out and "image 0: tokens" in out and "ok: 2 rows ready for training" in out
    bad = _jsonl(colour_images / "bad.jsonl", [{"image": "gone.png", "messages": [USER, {"role": "assistant",
                                                                                        "content": "x"}]}])
    assert main(["dataset", "validate", bad, "--model", str(tiny_vlm_dirs["qwen2_vl"])]) == 2
    assert "line 1, field 'image'" in capsys.readouterr().err


def test_parts_processor_rejects_extra_placeholders(tiny_vlm_dirs):
    from pmetal.vlm import load_processor

    processor = load_processor(str(tiny_vlm_dirs["qwen2_vl"]))
    with pytest.raises(PmetalError, match="more <\\|image_pad\\|> placeholders than images"):
        processor(text=["<|image_pad|>"], images=None)


def test_split_images_between_text_that_also_occurs_in_the_expansion(tiny_vlm_dirs, tmp_path):
    """Idefics3 with image splitting expands an image into tiles separated by newlines: a newline
    between two images must still be placed after the first image's whole expansion."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from pmetal.data.vlm import render_vlm_dataset
    from pmetal.vlm import load_processor
    from tests.tiny_vlm import write_colour_images

    write_colour_images(tmp_path, size=64)
    processor = load_processor(str(tiny_vlm_dirs["idefics3"]))
    processor.image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, do_image_splitting=True,
                                                          max_image_size={"longest_edge": 32})
    rows = [{"images": ["red.png", "blue.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                                     {"type": "text", "text": "Which?"}]},
        {"role": "assistant", "content": "red, blue"}]}]
    row = render_vlm_dataset(processor, rows, path=str(tmp_path / "d.jsonl"), max_seq_len=2048)[0].rows[0]
    (s0, e0), (s1, e1) = row["image_spans"]
    decode = processor.tokenizer.decode
    assert e0 - s0 == e1 - s1  # two images of one size: expansions of one length
    for s, e in ((s0, e0), (s1, e1)):
        text = decode(row["input_ids"][s:e])
        assert text.startswith("<fake_token_around_image><row_1_col_1>") and "<row_2_col_2>" in text
        assert text.endswith("<global-img><image><image><image><image><fake_token_around_image>")
    assert decode(row["input_ids"][e0:s1]) == "\n"
