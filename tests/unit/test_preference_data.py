"""Preference and KTO data: field aliases, conversational rows, errors, rendering, truncation, collation."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pmetal.data.formats import load_rows
from pmetal.data.kto import KtoDataModule, kto_balance_warning, to_kto_examples, tokenize_kto
from pmetal.data.preference import (
    PreferenceCollator,
    PreferenceDataModule,
    TruncationStats,
    to_preference_pairs,
    tokenize_pairs,
)
from pmetal.errors import DataError, PmetalError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pmetal.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(tmp_path, rows):
    path = _write(tmp_path, rows)
    return to_preference_pairs(load_rows(path))


def test_pair_aliases_and_instruction_input(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"instruction": "Translate", "input": "chat", "accepted": "cat", "dispreferred": "dog"},
        {"instruction": "Say hi", "preferred": "hi", "rejected_response": "bye", "system": "Be brief."},
        {"prompt": "Q4", "chosen_response": "yes", "rejected": "no"},
    ]
    pairs, skipped = _pairs(tmp_path, rows)
    assert skipped == []
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad"), ("cat", "dog"), ("hi", "bye"), ("yes", "no")]
    assert pairs[1].prompt == [{"role": "user", "content": "Translate\n\nchat"}]
    assert pairs[2].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def test_conversational_pairs_explicit_and_implicit_prompt(tmp_path):
    user = {"role": "user", "content": "Hi?"}
    rows = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        # Anthropic-HH style: the whole conversation in both, differing in the last assistant turn
        {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Go away."}]},
    ]
    pairs, _ = _pairs(tmp_path, rows)
    for pair in pairs:
        assert pair.prompt == [user] and (pair.chosen, pair.rejected) == ("Hello!", "Go away.")


def test_identical_pairs_are_skipped_and_counted(tmp_path, caplog):
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "same", "rejected": "same "}]
    with caplog.at_level(logging.WARNING, logger="pmetal"):
        pairs, skipped = _pairs(tmp_path, rows)
    assert len(pairs) == 1 and skipped == [2]
    assert "skipped 1 of 2 rows whose chosen and rejected completions are identical (rows 2)" in caplog.text
    with pytest.raises(DataError, match="no usable preference pairs"):
        _pairs(tmp_path, rows[1:])


@pytest.mark.parametrize(
    "row,message,field",
    [
        ({"prompt": "q", "rejected": "r"}, "line 2, field 'chosen': no chosen field (columns: prompt, rejected)"
         "\n  expected: one of chosen, accepted, preferred, chosen_response", "chosen"),
        ({"prompt": "q", "chosen": "c"}, "no rejected field", "rejected"),
        ({"prompt": "q", "chosen": "  ", "rejected": "r"}, "line 2, field 'chosen': completion is empty", "chosen"),
        ({"chosen": "c", "rejected": "r"}, "no prompt field", "prompt"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
         "the last message is a user turn, not the completion", "chosen"),
        ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}],
          "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "r"}]},
         "'chosen' and 'rejected' differ before their last message", "rejected"),
        ({"prompt": 7, "chosen": "c", "rejected": "r"}, "value is a int, not a string", "prompt"),
    ],
)
def test_bad_pair_rows_name_file_line_and_field(tmp_path, row, message, field):
    path = _write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as info:
        to_preference_pairs(load_rows(path))
    text = str(info.value)
    assert text.startswith(f"{path}, line 2, field '{field}'") and message in text, text
    assert info.value.row == 2 and info.value.field == field


def test_kto_labels_and_aliases(tmp_path):
    labels = [True, False, 1, 0, 1.0, "good", "BAD", "thumbs_up", "Undesirable", "yes", "false"]
    rows = [{"prompt": "q", ["completion", "response", "output"][k % 3]: f"a{k}", "label": v}
            for k, v in enumerate(labels)]
    examples = to_kto_examples(load_rows(_write(tmp_path, rows)))
    assert [e.desirable for e in examples] == [True, False, True, False, True, True, False, True, False, True, False]
    assert [e.completion for e in examples][:3] == ["a0", "a1", "a2"]


@pytest.mark.parametrize("label,got", [("meh", "unknown label 'meh'"), (2, "unknown label 2"), (None, "missing")])
def test_kto_bad_label_is_a_clear_error(tmp_path, label, got):
    path = _write(tmp_path, [{"prompt": "q", "completion": "a", "label": True},
                             {"prompt": "q", "completion": "a", "label": label}])
    with pytest.raises(DataError) as info:
        to_kto_examples(load_rows(path))
    assert str(info.value).startswith(f"{path}, line 2, field 'label': {got}")
    assert "expected: true/false, 1/0, or one of: good, yes, desirable" in str(info.value)


def test_kto_missing_completion(tmp_path):
    path = _write(tmp_path, [{"prompt": "q", "answer": "a", "label": True}])
    with pytest.raises(DataError, match="(?s)line 1, field .completion.: no completion field .*response, output"):
        to_kto_examples(load_rows(path))


def test_kto_balance_warning():
    assert kto_balance_warning(50, 50) is None and kto_balance_warning(60, 40) is None
    assert "consider undesirable_weight=9.00" in kto_balance_warning(90, 10)
    assert "consider desirable_weight=9.00" in kto_balance_warning(10, 90)
    assert kto_balance_warning(90, 10, undesirable_weight=9.0) is None  # weights already set
    assert "no undesirable examples" in kto_balance_warning(5, 0)


def test_pair_rendering_masks_the_prompt(tokenizer):
    pairs, _ = to_preference_pairs([{"prompt": "What is 2 plus 2?", "chosen": "FOUR.", "rejected": "four."}])
    (item,) = tokenize_pairs(tokenizer, pairs, max_seq_len=256)
    for side, text in (("chosen", "FOUR."), ("rejected", "four.")):
        ids, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
        trained = [t for t in labels if t != -100]
        assert tokenizer.decode(trained) == text + "<|im_end|>"
        prompt = tokenizer.decode(ids[: len(ids) - len(trained)])
        assert prompt.endswith("What is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    n_prompt = lambda side: sum(1 for t in item[f"{side}_labels"] if t == -100)  # noqa: E731
    assert n_prompt("chosen") == n_prompt("rejected")  # same prompt ids on both sides


def test_truncation_keeps_prompt_tail_and_counts(tokenizer):
    long_prompt = "filler " * 200 + "What is 2 plus 2?"
    pairs, _ = to_preference_pairs([{"prompt": long_prompt, "chosen": "FOUR.", "rejected": "four."}])
    stats = TruncationStats()
    (item,) = tokenize_pairs(tokenizer, pairs, max_seq_len=64, stats=stats)
    assert len(item["chosen_input_ids"]) == 64 and len(item["rejected_input_ids"]) == 64
    assert tokenizer.decode([t for t in item["chosen_labels"] if t != -100]) == "FOUR.<|im_end|>"
    assert "What is 2 plus 2?" in tokenizer.decode(item["chosen_input_ids"])  # the tail survived
    assert stats.sequences == 2 and stats.truncated == 2 and stats.tokens_cut > 2 * 150


def test_collator_pads_both_sides_to_one_length():
    items = [
        {"index": 0, "chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
         "rejected_input_ids": [1, 4, 5, 6, 7], "rejected_labels": [-100, 4, 5, 6, 7]},
        {"index": 1, "chosen_input_ids": [1, 8], "chosen_labels": [-100, 8],
         "rejected_input_ids": [1, 9], "rejected_labels": [-100, 9]},
    ]
    batch = PreferenceCollator(pad_token_id=0)(items)
    for key in ("chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids"):
        assert batch[key].shape == (2, 5), key
    assert batch["chosen_input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert batch["chosen_attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    assert batch["chosen_labels"][0].tolist() == [-100, 2, 3, -100, -100]
    assert batch["index"].tolist() == [0, 1]


def test_kto_kl_pairs_are_mismatched_and_fixed_by_seed(tokenizer):
    examples = to_kto_examples([{"prompt": f"Question {k}?", "completion": f"Answer {k}.", "label": k % 2 == 0}
                                for k in range(5)])
    items = tokenize_kto(tokenizer, examples, max_seq_len=128, seed=3)
    again = tokenize_kto(tokenizer, examples, max_seq_len=128, seed=3)
    assert items == again
    partners = []
    for k, item in enumerate(items):
        kl_answer = tokenizer.decode([t for t in item["kl_labels"] if t != -100])
        kl_prompt = tokenizer.decode([t for t, lab in zip(item["kl_input_ids"], item["kl_labels"]) if lab == -100])
        assert f"Question {k}?" in kl_prompt  # own prompt
        partners.append(int(kl_answer.split()[1].rstrip(".<|im_end|>")))
        assert tokenizer.decode([t for t in item["labels"] if t != -100]) == f"Answer {k}.<|im_end|>"
        assert item["desirable"] == (k % 2 == 0)
    assert sorted(partners) == list(range(5)) and all(p != k for k, p in enumerate(partners))  # a derangement


def test_preference_datamodule_split_and_batches(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{k}", "chosen": f"A{k}", "rejected": f"B{k}"} for k in range(10)]
    dm = PreferenceDataModule(str(_write(tmp_path, rows)), val_fraction=0.2, batch_size=3, max_seq_len=64,
                              tokenizer=tokenizer)
    dm.setup("fit")
    assert len(dm.train_items) == 8 and len(dm.val_items) == 2
    indices = [it["index"] for it in dm.train_items + dm.val_items]
    assert sorted(indices) == list(range(10))
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["chosen_input_ids"].shape[0] == 3 and batch["index"].dtype == torch.long
    assert len(list(dm.val_dataloader())) == 1
    assert sum(len(b["index"]) for loader in dm.ordered_dataloaders() for b in loader) == 10


def test_kto_datamodule_counts_and_eval_path(tmp_path, tokenizer):
    rows = [{"prompt": f"Q{k}", "completion": f"A{k}", "label": "good" if k < 6 else "bad"} for k in range(8)]
    dm = KtoDataModule(str(_write(tmp_path, rows)), eval_path=str(_write(tmp_path, rows[:2], "eval.jsonl")),
                       batch_size=4, tokenizer=tokenizer)
    dm.setup("fit")
    assert (dm.num_desirable, dm.num_undesirable) == (6, 2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["kl_input_ids"].shape and batch["desirable"].dtype == torch.bool
    assert [it["index"] for it in dm.val_items] == [8, 9]


def test_datamodule_without_tokenizer_is_a_clear_error(tmp_path):
    dm = PreferenceDataModule(str(_write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}])))
    with pytest.raises(PmetalError, match="PreferenceDataModule needs a tokenizer"):
        dm.setup("fit")


def test_shipped_example_files_parse():
    from importlib.resources import files

    data = files("pmetal.examples") / "data"
    pairs, skipped = to_preference_pairs(load_rows(str(data / "dpo.jsonl")))
    assert len(pairs) >= 100 and not skipped and all(p.chosen == p.rejected.upper() for p in pairs)
    kto = to_kto_examples(load_rows(str(data / "kto.jsonl")))
    assert 0.4 < sum(e.desirable for e in kto) / len(kto) < 0.6


# SmolLM2's tokenizer: "What is 2 plus 2?" -> 1780 314 216 34 8055 216 34 47; " 4." -> 216 36 30; <|im_end|> = 2
RAW_PAIR = {"prompt": "What is 2 plus 2?", "chosen": " 4.", "rejected": " 5, I think."}
QUESTION = [1780, 314, 216, 34, 8055, 216, 34, 47]
SMOLLM_SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                 8182, 2, 198]  # <|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n


@pytest.mark.parametrize("raw", [False, True], ids=["chat_template", "raw"])
def test_plain_string_pair_token_ids_either_way(tokenizer, raw):
    pairs, _ = to_preference_pairs([RAW_PAIR], raw=raw)
    (item,) = tokenize_pairs(tokenizer, pairs, max_seq_len=256)
    if raw:  # as TRL: prompt + completion + EOS, no template, no system prompt
        prompt = QUESTION
    else:  # system turn of the template, user turn, assistant header
        prompt = SMOLLM_SYSTEM + [1, 4093, 198] + QUESTION + [2, 198, 1, 520, 9531, 198]
    assert item["chosen_input_ids"] == prompt + [216, 36, 30, 2]
    assert item["chosen_labels"] == [-100] * len(prompt) + [216, 36, 30, 2]
    assert item["rejected_input_ids"] == prompt + [216, 37, 28, 339, 1510, 30, 2]
    assert item["rejected_labels"] == [-100] * len(prompt) + [216, 37, 28, 339, 1510, 30, 2]


def test_raw_pair_tokens_equal_trl(tokenizer):
    from trl.data_utils import _tokenize, common_prefix_length

    pairs, _ = to_preference_pairs([RAW_PAIR, {**RAW_PAIR, "chosen": "4<|im_end|>"}], raw=True)
    for row, item in zip([RAW_PAIR, {**RAW_PAIR, "chosen": "4<|im_end|>"}], tokenize_pairs(tokenizer, pairs, 256)):
        eos = tokenizer.eos_token
        prompt_ids = _tokenize(tokenizer, row["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            text = row[side] if row[side].endswith(eos) else row[side] + eos
            full = _tokenize(tokenizer, row["prompt"] + text)["input_ids"]
            start = common_prefix_length(prompt_ids, full)
            assert item[f"{side}_input_ids"] == full
            assert item[f"{side}_labels"] == [-100] * start + full[start:]


def test_raw_kto_rows_and_conversations_without_template(tmp_path, tokenizer):
    rows = [{"prompt": "What is 2 plus 2?", "completion": " 4.", "label": True},
            {"prompt": "What is 2 plus 2?", "completion": " 5, I think.", "label": False}]
    (item, _) = tokenize_kto(tokenizer, to_kto_examples(rows, raw=True), max_seq_len=128)
    assert item["input_ids"] == QUESTION + [216, 36, 30, 2]
    assert item["labels"] == [-100] * len(QUESTION) + [216, 36, 30, 2]
    conversation = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="cannot be tokenized without a chat template") as err:
        to_preference_pairs([RAW_PAIR, conversation], raw=True)
    assert "row 2" in str(err.value) and "prompt" in str(err.value)


def test_datamodule_chat_template_false_needs_no_template(tmp_path, tokenizer):
    import copy

    base_tokenizer = copy.deepcopy(tokenizer)
    base_tokenizer.chat_template = None  # a base model
    path = _write(tmp_path, [RAW_PAIR] * 4)
    dm = PreferenceDataModule(str(path), batch_size=2, tokenizer=base_tokenizer, chat_template=False)
    dm.setup("fit")
    assert dm.train_items[0]["chosen_input_ids"] == QUESTION + [216, 36, 30, 2]
    with pytest.raises(DataError, match="system_prompt needs a chat template"):
        PreferenceDataModule(str(path), tokenizer=base_tokenizer, chat_template=False, system_prompt="Be brief.")
