"""Embedding data: layouts, formats, the error messages, batches and the DataModule."""

from __future__ import annotations

import json

import pytest
import torch

from pmetal.data.embedding import (
    EmbeddingDataModule,
    EmbeddingExample,
    check_loss_layout,
    collate_embedding_examples,
    load_embedding_examples,
)
from pmetal.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "first,second", [("anchor", "positive"), ("query", "positive"), ("sentence1", "sentence2"), ("text_a", "text_b")]
)
def test_pair_aliases(tmp_path, first, second):
    kind, examples = load_embedding_examples(_jsonl(tmp_path / "p.jsonl", [{first: "q", second: "d"}]))
    assert kind == "pairs" and examples == [EmbeddingExample("q", "d")]


def test_scored_triplets_and_negative_lists(tmp_path):
    kind, ex = load_embedding_examples(_jsonl(tmp_path / "s.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 4.5},
                                                                     {"sentence1": "a", "sentence2": "c", "score": 0}]))
    assert kind == "scored" and [e.score for e in ex] == [4.5, 0.0]
    kind, ex = load_embedding_examples(_jsonl(tmp_path / "l.jsonl", [{"text_a": "a", "text_b": "b", "label": 1}]))
    assert kind == "scored" and ex[0].score == 1.0
    kind, ex = load_embedding_examples(_jsonl(tmp_path / "t.jsonl", [{"anchor": "a", "positive": "b", "negative": "c"}]))
    assert kind == "triplets" and ex[0].negatives == ("c",)
    kind, ex = load_embedding_examples(
        _jsonl(tmp_path / "n.jsonl", [{"query": "a", "positive": "b", "negatives": ["c", "d"]}])
    )
    assert kind == "triplets" and ex[0].negatives == ("c", "d")


def test_csv_and_parquet(tmp_path):
    (tmp_path / "s.csv").write_text("sentence1,sentence2,score\nhello,world,0.25\nfoo,bar,1\n", encoding="utf-8")
    kind, ex = load_embedding_examples(tmp_path / "s.csv", score_range=(0, 1))
    assert kind == "scored" and [e.score for e in ex] == [0.25, 1.0]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"anchor": ["a", "b"], "positive": ["c", "d"], "negative": ["e", "f"]}), tmp_path / "t.parquet")
    kind, ex = load_embedding_examples(tmp_path / "t.parquet")
    assert kind == "triplets" and ex[1] == EmbeddingExample("b", "d", ("f",))


def _error(tmp_path, rows, **kwargs) -> str:
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_embedding_examples(path, **kwargs)
    return str(info.value)


def test_error_unknown_columns(tmp_path):
    text = _error(tmp_path, [{"question": "a", "answer": "b"}])
    assert "bad.jsonl, line 1: cannot tell the embedding data layout from the columns: answer, question" in text
    assert "expected: pairs (anchor/positive" in text


def test_error_missing_and_empty_fields(tmp_path):
    text = _error(tmp_path, [{"anchor": "a", "positive": "b"}, {"anchor": "a"}])
    assert "bad.jsonl, line 2, field 'positive': missing value" in text and "expected: a string" in text
    text = _error(tmp_path, [{"anchor": "a", "positive": "b"}, {"anchor": "  ", "positive": "b"}])
    assert "line 2, field 'anchor': value is empty" in text and "a non-empty string" in text
    text = _error(tmp_path, [{"anchor": "a", "positive": 3}])
    assert "line 1, field 'positive': value is a int, not a string" in text


def test_error_scores(tmp_path):
    text = _error(tmp_path, [{"sentence1": "a", "sentence2": "b", "score": 1}, {"sentence1": "a", "sentence2": "b", "score": 7}])
    assert "bad.jsonl, line 2, field 'score': score 7 is out of range" in text
    assert "expected: a number in [0, 5] (set score_range to change it)" in text
    text = _error(tmp_path, [{"sentence1": "a", "sentence2": "b", "label": "high"}])
    assert "line 1, field 'label': score 'high' is not a number" in text
    text = _error(tmp_path, [{"sentence1": "a", "sentence2": "b", "score": None}])
    assert "field 'score': score is missing" in text
    text = _error(tmp_path, [{"sentence1": "a", "sentence2": "b", "score": "nan"}])
    assert "score is nan" in text and "a finite number" in text
    # a custom range accepts it
    _, ex = load_embedding_examples(_jsonl(tmp_path / "ok.jsonl", [{"sentence1": "a", "sentence2": "b", "score": -1}]),
                                    score_range=(-1, 1))
    assert ex[0].score == -1.0


def test_error_negatives(tmp_path):
    text = _error(tmp_path, [{"anchor": "a", "positive": "b", "negatives": ["c", "d"]},
                             {"anchor": "a", "positive": "b", "negatives": ["c"]}])
    assert "line 2, field 'negatives': row has 1 negatives, the first row has 2" in text
    text = _error(tmp_path, [{"anchor": "a", "positive": "b", "negatives": ["c", ""]}])
    assert "field 'negatives[1]': negative is empty" in text
    text = _error(tmp_path, [{"anchor": "a", "positive": "b", "negatives": "c"}])
    assert "negatives are a str" in text and "a non-empty list of strings" in text
    text = _error(tmp_path, [{"anchor": "a", "positive": "b", "negative": "c", "score": 1}])
    assert "row has both 'negative' and 'score'" in text


def test_loss_layout_check():
    check_loss_layout("infonce", "triplets")
    with pytest.raises(DataError, match="loss 'cosent' cannot train on pairs") as info:
        check_loss_layout("cosent", "pairs", "d.jsonl")
    assert str(info.value).startswith("d.jsonl: ") and "expected: scored" in str(info.value)
    with pytest.raises(DataError, match="loss 'triplet' cannot train on scored"):
        check_loss_layout("triplet", "scored")


def test_collate_ids_from_text_identity():
    batch = collate_embedding_examples([
        EmbeddingExample("q1", "doc", ("n1",)),
        EmbeddingExample("q2", "doc", ("q1",)),
        EmbeddingExample("q1", "other", ("n1",)),
    ])
    assert batch["anchor"] == ["q1", "q2", "q1"] and batch["negatives"] == [["n1", "q1", "n1"]]
    # equal ids exactly for equal texts, across anchors, positives and negatives
    texts = batch["anchor"] + batch["positive"] + batch["negatives"][0]
    ids = batch["anchor_ids"].tolist() + batch["positive_ids"].tolist() + batch["negative_ids"][:, 0].tolist()
    for i in range(len(texts)):
        for j in range(len(texts)):
            assert (texts[i] == texts[j]) == (ids[i] == ids[j]), (texts[i], texts[j])
    assert batch["negative_ids"].shape == (3, 1)
    scored = collate_embedding_examples([EmbeddingExample("a", "b", score=1.5), EmbeddingExample("c", "d", score=0.0)])
    assert scored["score"].dtype == torch.float32 and scored["score"].tolist() == [1.5, 0.0]
    assert "negatives" not in scored


def test_datamodule_split_and_loaders(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"anchor": f"q{i}", "positive": f"d{i}"} for i in range(10)])
    dm = EmbeddingDataModule(path=str(path), val_fraction=0.2, batch_size=4)
    dm.setup("fit")
    assert dm.kind == "pairs" and dm.eval_kind == "pairs"
    assert len(dm.train_examples) == 8 and len(dm.eval_examples) == 2
    assert not {e.anchor for e in dm.train_examples} & {e.anchor for e in dm.eval_examples}
    batches = list(dm.train_dataloader())
    assert [len(b["anchor"]) for b in batches] == [4, 4]
    assert len(list(dm.val_dataloader())) == 1
    no_eval = EmbeddingDataModule(path=str(path), val_fraction=0.0)
    no_eval.setup("fit")
    assert no_eval.val_dataloader() == [] and len(no_eval.train_examples) == 10
    with pytest.raises(DataError, match="file not found"):
        EmbeddingDataModule(path=str(tmp_path / "missing.jsonl")).setup("fit")
    with pytest.raises(DataError, match="val_fraction 1.5 is out of range"):
        EmbeddingDataModule(val_fraction=1.5)


def test_default_dataset_is_the_shipped_example():
    dm = EmbeddingDataModule()
    dm.setup("fit")
    assert dm.kind == "pairs" and len(dm.train_examples) + len(dm.eval_examples) == 256
    assert dm.eval_examples  # a held-out tenth by default
