"""Reading data files and detecting/normalizing SFT formats (pmetal.data.formats)."""

from __future__ import annotations

import json

import pytest

from pmetal.data.formats import Rows, coerce_messages, detect_format, load_rows, to_sft_examples
from pmetal.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


# ------------------------------------------------------------------------------ reading files

def test_reads_jsonl_json_csv_tsv_parquet(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text('text\na\n"b"\n')
    (tmp_path / "d.tsv").write_text("text\na\nb\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "wrapped.json", "d.csv", "d.tsv", "d.parquet"):
        assert list(load_rows(tmp_path / name)) == rows, name


def test_single_row_json_object_is_one_row(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"messages": CHAT}))
    assert list(load_rows(tmp_path / "one.json")) == [{"messages": CHAT}]


def test_jsonl_named_json_is_read_line_by_line(tmp_path):
    (tmp_path / "d.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for r in load_rows(tmp_path / "d.json")] == ["a", "b"]


def test_directory_concatenates_files_and_keeps_locations(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}])
    (tmp_path / "b.jsonl").write_text('\n{"text": "2"}\n{"text": "3"}\n')
    rows = load_rows(tmp_path)
    assert [r["text"] for r in rows] == ["1", "2", "3"]
    assert rows.locate(0) == (str(tmp_path / "a.jsonl"), 1, True)
    assert rows.locate(2) == (str(tmp_path / "b.jsonl"), 3, True)  # blank first line counted


# ------------------------------------------------------------------------------ file errors

def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as e:
        load_rows(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(e.value)


def test_unknown_extension(tmp_path):
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file extension '\.xml'") as e:
        load_rows(tmp_path / "d.xml")
    assert "d.xml" in str(e.value) and ".jsonl" in str(e.value)


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="e.jsonl: file is empty"):
        load_rows(tmp_path / "e.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl: file holds no rows"):
        load_rows(tmp_path / "blank.jsonl")


def test_malformed_jsonl_line_number(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(DataError) as e:
        load_rows(tmp_path / "bad.jsonl")
    assert str(e.value).startswith(f"{tmp_path / 'bad.jsonl'}, line 3: malformed JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="list.jsonl, line 2: line holds a JSON list, not an object"):
        load_rows(tmp_path / "list.jsonl")


def test_malformed_json_file_line_number(tmp_path):
    (tmp_path / "bad.json").write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match="bad.json, line 3: malformed JSON"):
        load_rows(tmp_path / "bad.json")


def test_csv_row_with_wrong_cell_count(tmp_path):
    (tmp_path / "bad.csv").write_text("prompt,response\na,b\nc,d,e\n")
    with pytest.raises(DataError, match="bad.csv, row 2: row has 3 cells but the header has 2"):
        load_rows(tmp_path / "bad.csv")


# ------------------------------------------------------------------------------ detection

@pytest.mark.parametrize(
    ("row", "fmt", "messages"),
    [
        ({"messages": CHAT}, "messages", CHAT),
        ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                            {"from": "gpt", "value": "Hello"}]},
         "sharegpt", [{"role": "system", "content": "S"}] + CHAT),
        ({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca",
         [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]),
        ({"instruction": "Add", "input": "", "output": "3"}, "alpaca",
         [{"role": "user", "content": "Add"}, {"role": "assistant", "content": "3"}]),
        ({"problem": "1+1?", "thinking": " one plus one ", "solution": "2"}, "reasoning",
         [{"role": "user", "content": "1+1?"},
          {"role": "assistant", "content": "<think>\none plus one\n</think>\n\n2"}]),
        ({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", CHAT),
        ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
         "prompt_completion", CHAT),
    ],
)
def test_detects_and_normalizes(tmp_path, row, fmt, messages):
    rows = load_rows(write_jsonl(tmp_path / "d.jsonl", [row]))
    detected, examples = to_sft_examples(rows)
    assert detected == fmt
    assert examples[0].messages == messages and examples[0].text is None


def test_plain_text_rows(tmp_path):
    fmt, examples = to_sft_examples(load_rows(write_jsonl(tmp_path / "t.jsonl", [{"text": "raw"}])))
    assert fmt == "text" and examples[0].text == "raw" and examples[0].messages is None


def test_custom_columns_and_system_prompt(tmp_path):
    (tmp_path / "qa.csv").write_text("question,answer\nWhy?,Because.\n")
    fmt, examples = to_sft_examples(load_rows(tmp_path / "qa.csv"), prompt_column="question",
                                    response_column="answer", system_prompt="Be kind.")
    assert fmt == "columns"
    assert examples[0].messages == [{"role": "system", "content": "Be kind."},
                                    {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]


def test_openai_content_parts_are_joined():
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}]
    assert coerce_messages(rows, 0, "messages")[0] == {"role": "user", "content": "ab"}


# ------------------------------------------------------------------------------ row errors

def _error(tmp_path, rows, **kwargs):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as e:
        to_sft_examples(load_rows(path), **kwargs)
    return str(e.value)


def test_unknown_columns_lists_found_and_accepted(tmp_path):
    msg = _error(tmp_path, [{"question": "q", "reply": "r"}])
    assert "data.jsonl, line 1: cannot tell the data format from the columns: question, reply" in msg
    assert "'messages'" in msg and "prompt_column" in msg


def test_missing_custom_column(tmp_path):
    msg = _error(tmp_path, [{"q": "a", "a": "b"}], prompt_column="q", response_column="answer")
    assert "data.jsonl, line 1, field 'answer': column 'answer' (from response_column) not found; columns: a, q" in msg


def test_non_string_content(tmp_path):
    rows = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]}]
    msg = _error(tmp_path, rows)
    assert "data.jsonl, line 2, field 'messages[1].content': content is a int, not a string" in msg


def test_empty_conversation(tmp_path):
    msg = _error(tmp_path, [{"messages": CHAT}, {"messages": CHAT}, {"messages": []}])
    assert "data.jsonl, line 3, field 'messages': conversation is empty" in msg


def test_unknown_role(tmp_path):
    msg = _error(tmp_path, [{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}])
    assert "data.jsonl, line 1, field 'conversations[1].from': unknown role 'robot'" in msg
    assert "expected: one of system, user, assistant, tool" in msg


def test_no_assistant_turn(tmp_path):
    msg = _error(tmp_path, [{"messages": [{"role": "user", "content": "a"}]}])
    assert "data.jsonl, line 1, field 'messages': conversation has no assistant message" in msg


def test_missing_and_non_string_fields(tmp_path):
    msg = _error(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}])
    assert "data.jsonl, line 2, field 'output': missing value" in msg
    msg = _error(tmp_path, [{"text": ["a"]}])
    assert "data.jsonl, line 1, field 'text': value is a list, not a string" in msg
    msg = _error(tmp_path, [{"problem": "p", "thinking": "t", "solution": "  "}])
    assert "data.jsonl, line 1, field 'solution': value is empty" in msg


def test_csv_errors_use_row_numbers(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,output\na,b\nc,\n")
    with pytest.raises(DataError, match=r"d.csv, row 2, field 'output': value is empty"):
        to_sft_examples(load_rows(tmp_path / "d.csv"))


def test_plain_list_rows_take_path_for_errors():
    with pytest.raises(DataError, match=r"mem.jsonl, row 1: cannot tell"):
        detect_format([{"x": 1}], path="mem.jsonl")
    assert isinstance(Rows([{"a": 1}]), list)
