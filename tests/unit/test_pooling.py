"""pmetal.embedding: pooling on hand-built masks (left and right padding, against sentence-transformers'
Pooling) and the evaluation metrics (retrieval recall/MRR, Spearman with ties, triplet accuracy)."""

from __future__ import annotations

import pytest
import torch

import math

from pmetal.embedding import average_ranks, pool, retrieval_metrics, spearman, triplet_accuracy
from pmetal.errors import PmetalError

F64 = torch.float64


def _tokens():
    # [B=2, T=4, H=2]: token t of row b is (10*b + t, -(10*b + t))
    base = torch.arange(4, dtype=F64)
    rows = [torch.stack([base + 10 * b, -(base + 10 * b)], dim=-1) for b in range(2)]
    return torch.stack(rows)


RIGHT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
LEFT = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])


def test_right_padding_hand_values():
    x = _tokens()
    assert torch.equal(pool(x, RIGHT, "cls"), torch.tensor([[0.0, 0.0], [10.0, -10.0]], dtype=F64))
    assert torch.equal(pool(x, RIGHT, "lasttoken"), torch.tensor([[2.0, -2.0], [11.0, -11.0]], dtype=F64))
    assert torch.allclose(pool(x, RIGHT, "mean"), torch.tensor([[1.0, -1.0], [10.5, -10.5]], dtype=F64))


def test_left_padding_hand_values():
    x = _tokens()
    assert torch.equal(pool(x, LEFT, "cls"), torch.tensor([[1.0, -1.0], [12.0, -12.0]], dtype=F64))
    assert torch.equal(pool(x, LEFT, "lasttoken"), torch.tensor([[3.0, -3.0], [13.0, -13.0]], dtype=F64))
    assert torch.allclose(pool(x, LEFT, "mean"), torch.tensor([[2.0, -2.0], [12.5, -12.5]], dtype=F64))


def test_same_text_left_or_right_padded_pools_the_same():
    # a 2-token sequence in a length-4 batch: right-padded at positions 0-1, left-padded at 2-3
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(2, 3, generator=g, dtype=F64)
    right = torch.zeros(1, 4, 3, dtype=F64)
    right[0, :2] = seq
    left = torch.zeros(1, 4, 3, dtype=F64)
    left[0, 2:] = seq
    for mode in ("cls", "mean", "lasttoken"):
        a = pool(right, torch.tensor([[1, 1, 0, 0]]), mode)
        b = pool(left, torch.tensor([[0, 0, 1, 1]]), mode)
        assert torch.allclose(a, b), mode


def test_empty_row_gives_zeros_and_no_nan():
    x = _tokens()
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    for mode in ("cls", "mean", "lasttoken"):
        out = pool(x, mask, mode)
        assert torch.equal(out[0], torch.zeros(2, dtype=F64)) and torch.isfinite(out).all()


def test_half_precision_mean_keeps_dtype():
    x = torch.randn(2, 5, 8).bfloat16()
    out = pool(x, torch.ones(2, 5, dtype=torch.long), "mean")
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), x.float().mean(1), atol=1e-2)


@pytest.mark.parametrize("mode", ["cls", "mean", "lasttoken"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_sentence_transformers_pooling(mode, side):
    from sentence_transformers.sentence_transformer.modules import Pooling

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 8, generator=g, dtype=F64)
    lengths = torch.tensor([6, 3, 1, 4])
    positions = torch.arange(6).unsqueeze(0)
    mask = positions < lengths.unsqueeze(1) if side == "right" else positions >= 6 - lengths.unsqueeze(1)
    mask = mask.long()
    ref = Pooling(8, mode)({"token_embeddings": x, "attention_mask": mask})["sentence_embedding"]
    assert torch.allclose(pool(x, mask, mode), ref)


def test_unknown_mode():
    with pytest.raises(PmetalError, match="cls, mean, lasttoken"):
        pool(_tokens(), RIGHT, "max")


# ---------------------------------------------------------------- metrics


def test_retrieval_metrics_hand_values():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    relevance = torch.tensor([[False, True, False], [False, False, True]])
    # q0's relevant doc is ranked 2nd (d0 is closer), q1's is ranked 1st
    m = retrieval_metrics(queries, docs, relevance, ks=(1, 2))
    assert m == pytest.approx({"recall@1": 0.5, "recall@2": 1.0, "mrr@10": 0.75})
    # two relevant documents for q0: recall@1 counts the fraction found
    both = torch.tensor([[True, True, False], [False, False, True]])
    m = retrieval_metrics(queries, docs, both, ks=(1, 2))
    assert m["recall@1"] == pytest.approx((0.5 + 1.0) / 2) and m["mrr@10"] == pytest.approx(1.0)
    # a relevant document outside the top k gives 0 for MRR@k
    m = retrieval_metrics(queries[:1], docs, torch.tensor([[False, False, True]]), ks=(1,), mrr_k=2)
    assert m == pytest.approx({"recall@1": 0.0, "mrr@2": 0.0})


def test_spearman_ties_and_reference():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.tensor([1.0, 2, 3]), torch.tensor([4.0, 4, 4])))
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (50,), generator=g).float()  # many ties
    y = x + torch.randn(50, generator=g)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_triplet_accuracy():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert triplet_accuracy(a, p, n) == 0.5
