"""Chat-template rendering and loss masks on SmolLM2's real tokenizer (pmetal.data.render)."""

from __future__ import annotations

import copy

import pytest

from pmetal.data.formats import SftExample
from pmetal.data.render import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    ensure_chat_template,
    render_example,
    render_messages,
    render_prompt,
    render_prompt_completion,
)
from pmetal.errors import PmetalError

# SmolLM2 token ids (hand-checked with tokenizer.convert_ids_to_tokens)
IM_START, IM_END, NL = 1, 2, 198
ASSISTANT = [520, 9531]  # 'ass', 'istant'


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def trained(tok, row):
    """The trained tokens as strings, one list per contiguous trained run."""
    runs, current = [], []
    for token, label in zip(row.input_ids, row.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(tok.decode([token]))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def test_mask_covers_assistant_content_and_im_end_only(tok):
    row = render_messages(tok, CHAT)
    assert tok.decode(row.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert trained(tok, row) == [["Hello", "!", "<|im_end|>"], ["See", " you", ".", "<|im_end|>"]]
    # hand-checked positions: the header "<|im_start|>assistant\n" right before "Hello" is masked
    first = row.labels.index(next(x for x in row.labels if x != IGNORE_INDEX))
    assert row.input_ids[first - 4:first] == [IM_START, *ASSISTANT, NL]
    assert row.labels[first - 4:first] == [IGNORE_INDEX] * 4
    # the newline after each <|im_end|> is scaffolding, not trained
    assert row.input_ids[-2:] == [IM_END, NL] and row.labels[-2:] == [IM_END, IGNORE_INDEX]
    assert row.num_trained == 7 and not row.truncated


def test_default_system_prompt_of_template_is_masked(tok):
    row = render_messages(tok, CHAT[1:3])
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(row.input_ids)
    assert trained(tok, row) == [["Hello", "!", "<|im_end|>"]]


def test_train_on_prompt_trains_everything(tok):
    row = render_messages(tok, CHAT, train_on_prompt=True)
    assert row.labels == row.input_ids


def test_truncation_keeps_start_and_flags(tok):
    full = render_messages(tok, CHAT)
    row = render_messages(tok, CHAT, max_seq_len=10)
    assert row.truncated and row.input_ids == full.input_ids[:10] and row.labels == full.labels[:10]


def test_plain_text_rows_train_everything_and_end_with_eos(tok):
    row = render_example(tok, SftExample(text="hello world"))
    assert row.input_ids[-1] == tok.eos_token_id and row.labels == row.input_ids
    assert tok.decode(row.input_ids[:-1]) == "hello world"


def test_render_prompt_ends_with_generation_header(tok):
    ids = render_prompt(tok, CHAT[:2])
    assert ids[-4:] == [IM_START, *ASSISTANT, NL]
    assert tok.decode(ids) == tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)


def test_render_prompt_completion_labels_the_completion_with_end_of_turn(tok):
    ids, labels, truncated = render_prompt_completion(tok, CHAT[:2], "Hello!")
    prompt = render_prompt(tok, CHAT[:2])
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert [tok.decode([t]) for t in labels[len(prompt):]] == ["Hello", "!", "<|im_end|>"]
    assert not truncated
    # the message-dict and list forms give the same result
    same = render_prompt_completion(tok, CHAT[:2], {"role": "assistant", "content": "Hello!"})
    assert same == (ids, labels, False)
    assert render_prompt_completion(tok, CHAT[:2], [{"role": "assistant", "content": "Hello!"}]) == same


def test_render_prompt_completion_truncation_keeps_prompt_tail(tok):
    ids, labels, truncated = render_prompt_completion(tok, CHAT[:2], "Hello!", max_seq_len=8)
    assert truncated and len(ids) == 8
    assert ids[-3:] == labels[-3:]  # the whole completion survives
    assert ids[:5] == render_prompt(tok, CHAT[:2])[-5:]  # the prompt's tail
    # a completion longer than the budget keeps half of it for the prompt, then cuts the completion
    ids, labels, _ = render_prompt_completion(tok, CHAT[:2], "word " * 50, max_seq_len=12)
    assert len(ids) == 12 and labels[:6] == [IGNORE_INDEX] * 6 and IGNORE_INDEX not in labels[6:]
    ids, labels, _ = render_prompt_completion(tok, CHAT[:2], "Hello!", max_seq_len=8, keep="start")
    assert ids == render_prompt(tok, CHAT[:2])[:8] and labels == [IGNORE_INDEX] * 8
    with pytest.raises(PmetalError, match="keep='middle'"):
        render_prompt_completion(tok, CHAT[:2], "x", keep="middle")


def test_no_chat_template_is_a_clear_error_unless_chatml_is_chosen(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(PmetalError, match="has no chat template.*chat_template='chatml'"):
        render_messages(bare, CHAT)
    with pytest.raises(PmetalError, match="has no chat template"):
        ensure_chat_template(bare)
    ensure_chat_template(bare, "chatml")
    assert bare.chat_template == CHATML_TEMPLATE
    row = render_messages(bare, CHAT)
    assert trained(tok, row) == [["Hello", "!", "<|im_end|>"], ["See", " you", ".", "<|im_end|>"]]
    assert "helpful AI assistant" not in tok.decode(row.input_ids)  # ChatML adds no default system
    with pytest.raises(PmetalError, match="neither 'chatml'"):
        ensure_chat_template(bare, "llama9")


def test_template_error_becomes_pmetal_error(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = "{% for m in messages %}{{ raise_exception('roles must alternate') }}{% endfor %}"
    with pytest.raises(PmetalError, match="chat template rejected this conversation: roles must alternate"):
        render_messages(strict, CHAT)


def test_template_without_end_of_turn_gets_eos(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    row = render_messages(plain, CHAT[1:3])
    assert row.input_ids[-1] == tok.eos_token_id and row.labels[-1] == tok.eos_token_id
    # " Hello" merges the template's space before the answer: overlapping tokens are trained
    assert tok.decode([t for t in row.labels if t != IGNORE_INDEX]) == " Hello! <|im_end|>"


def test_history_rewriting_template_leaves_that_turn_untrained(tok):
    # drops every assistant message but the last from history (like templates that strip reasoning)
    rewriting = copy.deepcopy(tok)
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    row = render_messages(rewriting, CHAT)
    assert trained(tok, row) == [["See", " you", ".", "<|im_end|>"]]


GENERATION_CHATML = (  # ChatML with {% generation %} blocks: transformers' own assistant mask
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_mask_matches_transformers_generation_mask_on_the_shipped_data(tok):
    """Independent reference: `return_assistant_tokens_mask` on a template marking assistant turns."""
    from pmetal.data.formats import example_path, load_rows, to_sft_examples

    marked = copy.deepcopy(tok)
    marked.chat_template = GENERATION_CHATML
    _, examples = to_sft_examples(load_rows(example_path()))
    multi_turn = [e for e in examples if sum(m["role"] == "assistant" for m in e.messages) > 1][:10]
    assert len(multi_turn) == 10
    for example in examples[:20] + multi_turn + [SftExample(messages=CHAT)]:
        reference = marked.apply_chat_template(example.messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        row = render_messages(marked, example.messages)
        assert row.input_ids == list(reference["input_ids"])
        assert [x != IGNORE_INDEX for x in row.labels] == [bool(m) for m in reference["assistant_masks"]]


def test_template_error_in_a_file_names_file_and_line(tok, tmp_path):
    import json

    from pmetal.data.formats import load_rows, to_sft_examples
    from pmetal.data.render import render_sft_dataset
    from pmetal.errors import DataError

    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('system messages are not supported') }}{% endif %}"
                            "{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT[1:3]}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    rows = load_rows(path)
    _, examples = to_sft_examples(rows)
    with pytest.raises(DataError, match=r"chat.jsonl, line 2, field 'messages': the chat template rejected this "
                                        r"conversation: system messages are not supported"):
        render_sft_dataset(strict, rows, examples)
