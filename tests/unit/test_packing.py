"""Padding-free packing: bins, collate, and attention confined to each packed row."""

from __future__ import annotations

import random

import pytest
import torch

from pmetal.data.packing import pack_rows, packed_collate, packing_efficiency
from pmetal.errors import DataError
from pmetal.logps import backbone_hidden, completion_logps, lm_loss

from tests.tiny import tiny_llama

VOCAB = 61


def _tiny_llama(attn="sdpa", seed=0):
    return tiny_llama(VOCAB, seed, attn_implementation=attn)


def _rows(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[: length // 3] = -100  # a prompt
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def test_pack_rows_best_fit_decreasing():
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]  # 6+2, 5+3, 4
    assert pack_rows([3, 5, 4, 3], 8) == [[1, 0], [2, 3]]  # ties keep input order
    lengths = [random.Random(i).randint(1, 100) for i in range(300)]
    bins = pack_rows(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 11 // 9 + 1  # FFD/BFD guarantee: <= 11/9 OPT + 6/9
    assert packing_efficiency(lengths, bins, 128) > 0.9
    assert packing_efficiency([4, 4], [[0], [1]], 8) == 0.5


def test_pack_rows_errors():
    with pytest.raises(DataError, match=r"row 2.*does not fit.*\n  expected: rows of at most max_tokens=8"):
        pack_rows([3, 9], 8)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_rows([1], 0)


def test_packed_collate_format():
    batch = packed_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # row 2's first label is never a target
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["seq_lens"].tolist() == [3, 2]
    assert "attention_mask" not in batch
    with pytest.raises(ValueError, match="differ in length"):
        packed_collate([{"input_ids": [1, 2], "labels": [1]}])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_row_alone_and_no_cross_attention(attn):
    model = _tiny_llama(attn)
    rows = _rows([7, 12, 5])
    batch = packed_collate(rows)
    with torch.no_grad():
        packed = backbone_hidden(model, batch["input_ids"], seq_lens=batch["seq_lens"])[0]  # [N, H]
        start = 0
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            alone = backbone_hidden(model, ids)[0]
            torch.testing.assert_close(packed[start : start + ids.shape[1]], alone, atol=1e-5, rtol=1e-5)
            start += ids.shape[1]
        # Perturb row A (the first): row B's and C's hidden states must not move at all.
        perturbed = batch["input_ids"].clone()
        perturbed[0, :7] = (perturbed[0, :7] + 1) % VOCAB
        moved = backbone_hidden(model, perturbed, seq_lens=batch["seq_lens"])[0]
    assert (moved[:7] - packed[:7]).abs().max() > 1e-3
    assert torch.equal(moved[7:], packed[7:])


def test_packed_completion_logps_per_row():
    model = _tiny_llama()
    rows = _rows([6, 10, 4, 9], seed=1)
    batch = packed_collate(rows)
    out = completion_logps(
        model, batch["input_ids"], None, batch["labels"], position_ids=batch["position_ids"], seq_lens=batch["seq_lens"]
    )
    for i, row in enumerate(rows):
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        alone = completion_logps(model, ids, torch.ones_like(ids), labels)
        torch.testing.assert_close(out.sum[i], alone.sum[0], atol=1e-5, rtol=1e-5)
        assert out.num_tokens[i] == alone.num_tokens[0]


def _padded(rows):
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_packed_training_matches_padded_training():
    rows = _rows([9, 14, 5, 11, 7, 13, 6, 10], seed=2)
    losses = {}
    for mode in ("padded", "packed"):
        model = _tiny_llama(seed=3).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[mode] = []
        for step in range(4):
            chunk = rows[(step % 2) * 4 : (step % 2) * 4 + 4]
            batch = _padded(chunk) if mode == "padded" else packed_collate(chunk)
            loss, num_tokens = lm_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[mode].append(loss.item())
    assert losses["padded"][-1] < losses["padded"][0] - 0.1  # it learns
    assert losses["packed"] == pytest.approx(losses["padded"], abs=1e-4)


def test_stacked_bins_equal_rows_alone():
    from pmetal.data.packing import stack_packed

    model = _tiny_llama()
    rows = _rows([5, 9, 4, 7, 6], seed=4)
    bins = pack_rows([len(r["input_ids"]) for r in rows], 14)
    assert bins == [[1, 0], [3, 4], [2]]
    batch = stack_packed([packed_collate([rows[i] for i in b]) for b in bins], 14)
    assert batch["input_ids"].shape == (3, 14)
    assert batch["seq_lens"].tolist() == [9, 5, 7, 6, 1, 4, 10]  # pad segments listed as rows
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 3] + list(range(10))
    out = completion_logps(model, batch["input_ids"], None, batch["labels"], seq_lens=batch["seq_lens"])
    order = [i for b in bins for i in b]
    real = [0, 1, 2, 3, 5]
    for j, i in zip(real, order):
        ids, labels = torch.tensor([rows[i]["input_ids"]]), torch.tensor([rows[i]["labels"]])
        alone = completion_logps(model, ids, torch.ones_like(ids), labels)
        torch.testing.assert_close(out.sum[j], alone.sum[0], atol=1e-5, rtol=1e-5)
    assert out.num_tokens[[4, 6]].tolist() == [0, 0]
    with pytest.raises(ValueError, match="more than length"):
        stack_packed([packed_collate(rows[:3])], 10)
    with pytest.raises(ValueError, match="seq_lens sum to"):
        completion_logps(model, batch["input_ids"], None, batch["labels"], seq_lens=batch["seq_lens"][:-1])
