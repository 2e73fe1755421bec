"""`pmetal dataset validate|preview`, run in-process, and the inspection helpers behind it."""

from __future__ import annotations

import argparse
import json

import pytest

from pmetal.cli.commands import dataset
from pmetal.data.inspect import LengthStats, show_mask
from pmetal.errors import DataError


def parse(*argv):
    parser = argparse.ArgumentParser()
    dataset.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture()
def chat_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("apple", "banana split with cherries on top", "kiwi")]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(autouse=True)
def _tokenizer_from_fixture(monkeypatch, smollm2_dir):
    """`--model default` resolves to the cached SmolLM2 directory (no GGUF conversion in tests)."""
    import pmetal.models

    real = pmetal.models.load_tokenizer
    monkeypatch.setattr(pmetal.models, "load_tokenizer",
                        lambda name="default", **kw: real(smollm2_dir if name == "default" else name, **kw))


def test_validate_prints_format_counts_lengths_and_mask(chat_file, capsys):
    assert dataset.run(parse("validate", str(chat_file), "--color", "never")) == 0
    out = capsys.readouterr().out
    assert f"file:        {chat_file}" in out
    assert "format:      messages (OpenAI messages [{role, content}])" in out
    assert "rows:        3 (3 usable, 0 without a token to learn from within max_seq_len)" in out
    # hand-checked: SmolLM2's default system block is 21 tokens, "<|im_start|>user\nSay apple.<|im_end|>\n" 8,
    # the assistant header 4 (<|im_start|>, "ass", "istant", "\n"), then answer + <|im_end|> + "\n"
    assert "tokens/row:  min 36  mean 40.0  p95 47  max 47" in out
    assert "truncated:   0 rows longer than max_seq_len=1024" in out
    assert "--- line 1: 36 tokens, 2 with loss" in out
    assert "<|im_start|>user\nSay apple.<|im_end|>\n<|im_start|>assistant\n[[apple<|im_end|>]]\n" in out
    assert out.rstrip().endswith("ok: 3 rows ready for training")


def test_validate_counts_truncation(chat_file, capsys):
    assert dataset.run(parse("validate", str(chat_file), "--max-seq-len", "46", "--color", "never")) == 0
    out = capsys.readouterr().out
    assert "truncated:   1 rows longer than max_seq_len=46" in out
    assert "rows:        3 (3 usable" in out


def test_validate_fails_when_nothing_is_learnable(chat_file, capsys):
    with pytest.raises(DataError, match="chat.jsonl: no row has a token to learn from"):
        dataset.run(parse("validate", str(chat_file), "--max-seq-len", "30"))
    assert "rows:        3 (0 usable, 3 without a token" in capsys.readouterr().out


def test_preview_shows_rows_as_written_and_rendered(chat_file, capsys):
    assert dataset.run(parse("preview", str(chat_file), "--n", "2", "--color", "never")) == 0
    out = capsys.readouterr().out
    assert "format messages, 3 rows; showing 2" in out
    assert out.count("=== as written:") == 2 and '"content": "banana split with cherries on top"' in out
    assert "[[banana split with cherries on top<|im_end|>]]" in out and "kiwi" not in out


def test_color_marks_loss_in_green(chat_file, capsys):
    dataset.run(parse("preview", str(chat_file), "--n", "1", "--color", "always"))
    assert "\033[1;32mapple<|im_end|>\033[0m" in capsys.readouterr().out


def test_bad_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 1, field 'messages': conversation is empty"):
        dataset.run(parse("validate", str(bad)))


def test_cli_exit_code_and_message(tmp_path, capsys):
    from pmetal.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("question,reply\na,b\n")
    assert main(["dataset", "validate", str(bad)]) == 2
    assert "bad.csv, row 1: cannot tell the data format from the columns: question, reply" in capsys.readouterr().err


def test_custom_columns_flags(tmp_path, capsys):
    path = tmp_path / "qa.csv"
    path.write_text("question,reply\nWhy?,Because.\n")
    args = parse("validate", str(path), "--prompt-column", "question", "--response-column", "reply", "--color", "never")
    assert dataset.run(args) == 0
    out = capsys.readouterr().out
    assert "format:      columns" in out and "--- row 1:" in out and "[[Because.<|im_end|>]]" in out


def test_length_stats_and_show_mask_helpers():
    assert str(LengthStats.of([1, 2, 3, 4, 100])) == "min 1  mean 22.0  p95 100  max 100"
    assert LengthStats.of(list(range(1, 101))).p95 == 95

    class Chars:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    ids = [ord(c) for c in "abcde"]
    assert show_mask(Chars(), ids, [-100, ids[1], ids[2], -100, ids[4]]) == "a[[bc]]d[[e]]"
