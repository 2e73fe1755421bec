"""Embedding losses: hand-worked values, edge cases, and sentence-transformers 6 as the reference."""

from __future__ import annotations

import math

import pytest
import torch

from pmetal.losses.embedding import cosent_loss, duplicate_text_mask, info_nce_loss, triplet_loss

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

F64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_hand_values():
    a = _t([[1, 0], [0, 1]])
    p = _t([[1, 0], [0, 1]])
    # logits = I / tau: l_i = log(e^{1/tau} + 1) - 1/tau
    assert torch.allclose(info_nce_loss(a, p, temperature=1.0), _t([math.log(1 + math.e**-1)] * 2))
    assert torch.allclose(info_nce_loss(a, p, temperature=0.5), _t([math.log(1 + math.e**-2)] * 2))
    # the hard negative of each row points at the other row's direction:
    # candidates (1,0) (0,1) (0,1) (1,0) -> row 1 logits 1 0 0 1: log(2e + 2) - 1
    n = _t([[0, 1], [1, 0]])
    expected = math.log(2 * math.e + 2) - 1
    assert torch.allclose(info_nce_loss(a, p, n, temperature=1.0), _t([expected, expected]))


def test_info_nce_is_cosine_so_scale_of_embeddings_does_not_matter():
    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(4, 8, generator=g, dtype=F64), torch.randn(4, 8, generator=g, dtype=F64)
    assert torch.allclose(info_nce_loss(a, p), info_nce_loss(3 * a, 0.1 * p))


@pytest.mark.parametrize("num_negatives", [0, 1, 3])
def test_info_nce_matches_sentence_transformers(num_negatives):
    g = torch.Generator().manual_seed(num_negatives)
    a, p = torch.randn(8, 16, generator=g, dtype=F64), torch.randn(8, 16, generator=g, dtype=F64)
    negs = torch.randn(8, num_negatives, 16, generator=g, dtype=F64) if num_negatives else None
    ours = info_nce_loss(a, p, negs, temperature=0.05).mean()
    columns = [a, p] + ([negs[:, k] for k in range(num_negatives)] if num_negatives else [])
    ref = st_losses.MultipleNegativesRankingLoss(None, scale=20.0).compute_loss_from_embeddings(columns, None)
    assert ours.dtype == F64
    assert torch.allclose(ours, ref, atol=1e-10)


def test_duplicate_text_mask_and_masked_loss():
    # rows 0 and 2 share the positive text; rows 1 and 3 share the anchor (query) text
    anchor_ids = torch.tensor([0, 1, 2, 1])
    positive_ids = torch.tensor([10, 11, 10, 12])
    mask = duplicate_text_mask(anchor_ids, positive_ids)
    expected = torch.tensor(
        [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    # with a hard negative that repeats row 1's positive text: a false negative for row 1 only
    mask_n = duplicate_text_mask(anchor_ids, positive_ids, torch.tensor([20, 21, 11, 22]))
    assert mask_n.shape == (4, 8)
    assert mask_n[1, 4 + 2] and not mask_n[0, 4 + 2] and mask_n[:, 4:].sum() == 1

    # a duplicated document must not be a negative: the loss equals the loss of the batch without it
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 8, generator=g, dtype=F64)
    p = torch.randn(3, 8, generator=g, dtype=F64)
    p[2] = p[0]  # row 2 has the same positive text as row 0
    masked = info_nce_loss(a, p, false_negative_mask=duplicate_text_mask(torch.arange(3), torch.tensor([0, 1, 0])))
    unmasked = info_nce_loss(a, p)
    # row 0 without the duplicate: only candidates p0, p1 remain
    logits = torch.nn.functional.normalize(a[0], dim=0) @ torch.nn.functional.normalize(p[:2], dim=1).T / 0.05
    assert torch.allclose(masked[0], torch.logsumexp(logits, 0) - logits[0])
    assert (unmasked[[0, 2]] > masked[[0, 2]]).all()
    with pytest.raises(ValueError, match="diagonal"):
        info_nce_loss(a, p, false_negative_mask=torch.eye(3, dtype=torch.bool))


def test_info_nce_bf16_is_computed_in_float32():
    a, p = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    assert info_nce_loss(a, p).dtype == torch.float32


# ---------------------------------------------------------------- triplet


def test_triplet_hand_values_true_distances():
    a, p, n = _t([[0, 0]]), _t([[1, 0]]), _t([[3, 0]])  # d(a,p) = 1, d(a,n) = 3
    assert triplet_loss(a, p, n, margin=0.5).item() == 0.0
    assert triplet_loss(a, p, n, margin=5.0).item() == pytest.approx(3.0)
    assert triplet_loss(a, n, p, margin=0.5).item() == pytest.approx(2.5)  # swapped: 3 - 1 + 0.5
    # cosine distance: 1 - cos 45deg vs 1 - cos 90deg
    a, p, n = _t([[1, 0]]), _t([[1, 1]]), _t([[0, 1]])
    assert triplet_loss(a, p, n, margin=1.0, distance="cosine").item() == pytest.approx(1 - math.sqrt(0.5))


def test_sentence_transformers_triplet_uses_true_euclidean_distances():
    """The issue said ST 5+/6 negates Euclidean distances; 6.2 does not: same hand value as ours (3)."""
    a, p, n = _t([[0, 0]]), _t([[1, 0]]), _t([[3, 0]])
    ref = st_losses.TripletLoss(None, distance_metric=st_losses.TripletDistanceMetric.EUCLIDEAN, triplet_margin=5)
    assert ref.compute_loss_from_embeddings([a, p, n], None).item() == pytest.approx(3.0)


@pytest.mark.parametrize("distance,metric", [("euclidean", "EUCLIDEAN"), ("cosine", "COSINE")])
def test_triplet_matches_sentence_transformers(distance, metric):
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(16, 8, generator=g, dtype=F64) for _ in range(3))
    margin = 1.0 if distance == "euclidean" else 0.3
    ours = triplet_loss(a, p, n, margin=margin, distance=distance).mean()
    ref = st_losses.TripletLoss(
        None, distance_metric=getattr(st_losses.TripletDistanceMetric, metric), triplet_margin=margin
    ).compute_loss_from_embeddings([a, p, n], None)
    assert 0 < ours.item()  # some triplets active, some not: a meaningful comparison
    assert torch.allclose(ours, ref, atol=1e-10)


def test_triplet_gradient_finite_when_anchor_equals_positive():
    a = torch.randn(2, 4, dtype=F64, requires_grad=True)
    loss = triplet_loss(a, a.detach().clone(), torch.randn(2, 4, dtype=F64), margin=10.0).sum()
    loss.backward()
    assert torch.isfinite(a.grad).all()


def test_triplet_unknown_distance():
    with pytest.raises(ValueError, match="euclidean, cosine"):
        triplet_loss(_t([[0.0]]), _t([[0.0]]), _t([[0.0]]), distance="manhattan")


# ---------------------------------------------------------------- CoSENT


def test_cosent_hand_values():
    a = _t([[1, 0], [1, 0]])
    b = _t([[1, 0], [0, 1]])  # cos = 1, 0
    # scores agree with the cosines: log(1 + e^{20 (0 - 1)})
    assert cosent_loss(a, b, _t([1, 0])).item() == pytest.approx(math.log1p(math.exp(-20)), rel=1e-9)
    # scores disagree: log(1 + e^{lambda (1 - 0)})
    assert cosent_loss(a, b, _t([0, 1]), scale=1.0).item() == pytest.approx(math.log(1 + math.e))
    assert cosent_loss(a, b, _t([0, 1])).item() == pytest.approx(20 + math.log1p(math.exp(-20)))
    # three pairs, cos = 1, 0, -1 and scores 0, 1, 2: every ordered pair is wrong (i > j in score)
    a3, b3 = _t([[1, 0], [1, 0], [1, 0]]), _t([[1, 0], [0, 1], [-1, 0]])
    expected = math.log(1 + math.exp(1) + math.exp(2) + math.exp(1))
    assert cosent_loss(a3, b3, _t([0, 1, 2]), scale=1.0).item() == pytest.approx(expected)


def test_cosent_ties_and_all_equal_scores_are_finite():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 8, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(6, 8, generator=g, dtype=F64)
    loss = cosent_loss(a, b, torch.full((6,), 0.7, dtype=F64))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a.grad))
    # ties inside a batch only drop the tied pairs
    tied = cosent_loss(a, b, _t([1, 1, 2, 2, 3, 3]))
    assert torch.isfinite(tied)
    # extreme scale, zero vectors: still finite values and gradients
    z = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    extreme = cosent_loss(z, torch.randn(3, 4, dtype=F64), _t([0, 1, 2]), scale=1e6)
    extreme.backward()
    assert torch.isfinite(extreme) and torch.isfinite(z.grad).all()
    big = cosent_loss(a.detach(), -a.detach(), _t([3, 2, 1, 0, -1, -2]), scale=1e4)
    assert torch.isfinite(big)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True)])
def test_cosent_matches_sentence_transformers(seed, ties):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(16, 8, generator=g, dtype=F64), torch.randn(16, 8, generator=g, dtype=F64)
    scores = torch.randint(0, 4, (16,), generator=g).to(F64) if ties else torch.rand(16, generator=g, dtype=F64)
    ours = cosent_loss(a, b, scores, scale=20.0)
    ref = st_losses.CoSENTLoss(None, scale=20.0).compute_loss_from_embeddings([a, b], scores)
    assert torch.allclose(ours, ref, atol=1e-9)


def test_cosent_shape_error():
    with pytest.raises(ValueError, match="one value per pair"):
        cosent_loss(_t([[1, 0]]), _t([[1, 0]]), _t([1, 2]))
