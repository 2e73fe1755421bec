"""Embedding losses: InfoNCE with in-batch negatives, triplet, CoSENT.

Pure functions on sentence embeddings; no model, no tokenizer, no module here. They work in the
dtype they are given (float64 in tests); half-precision similarities are upcast to float32 before
the softmax so bf16 training on MPS/CUDA does not lose the small logit differences.

Similarities are cosine by default (the embeddings are L2-normalized inside the loss, which is a
no-op when the model already normalizes), as in sentence-transformers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Similarity = Literal["cosine", "dot"]
TripletDistance = Literal["euclidean", "cosine"]
TRIPLET_DISTANCES: tuple[str, ...] = ("euclidean", "cosine")


def _similarity_matrix(a: torch.Tensor, b: torch.Tensor, similarity: Similarity) -> torch.Tensor:
    if similarity == "cosine":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"unknown similarity {similarity!r}; expected 'cosine' or 'dot'")
    return a @ b.T


def _as_columns(negatives: torch.Tensor | None, batch_size: int) -> list[torch.Tensor]:
    """Hard negatives `[B,H]` or `[B,K,H]` as a list of K tensors `[B,H]` (column k = k-th negative)."""
    if negatives is None:
        return []
    if negatives.ndim == 2:
        negatives = negatives.unsqueeze(1)
    if negatives.ndim != 3 or negatives.shape[0] != batch_size:
        raise ValueError(f"negatives must be [B,H] or [B,K,H] with B={batch_size}, got {tuple(negatives.shape)}")
    return list(negatives.unbind(1))


def duplicate_text_mask(
    anchor_ids: torch.Tensor,  # [B] long: one id per distinct anchor text in the batch
    positive_ids: torch.Tensor,  # [B] long: ids from the same text -> id map as anchor_ids
    negative_ids: torch.Tensor | None = None,  # [B] or [B,K] long
) -> torch.Tensor:  # [B, B*(1+K)] bool
    """Which in-batch candidates are not true negatives for each anchor, from text identity.

    Candidate j (ordered as in `info_nce_loss`: the B positives, then the B first hard negatives,
    ...) is a false negative for anchor i when its text is anchor i's positive text, or when it is
    the positive of a row whose anchor text equals anchor i's (a query repeated with another
    relevant document). The own positive (the diagonal) is never masked.
    """
    batch_size = anchor_ids.shape[0]
    candidate_ids = [positive_ids]
    if negative_ids is not None:
        negative_ids = negative_ids.unsqueeze(1) if negative_ids.ndim == 1 else negative_ids
        candidate_ids += list(negative_ids.unbind(1))
    candidates = torch.cat(candidate_ids)  # [C] with C = B*(1+K)
    mask = candidates.unsqueeze(0) == positive_ids.unsqueeze(1)  # [B, C]: same text as my positive
    same_anchor = anchor_ids.unsqueeze(0) == anchor_ids.unsqueeze(1)  # [B, B]
    mask[:, :batch_size] |= same_anchor
    own = torch.arange(batch_size, device=mask.device)
    mask[own, own] = False
    return mask


def info_nce_loss(
    anchors: torch.Tensor,  # [B,H]
    positives: torch.Tensor,  # [B,H]
    negatives: torch.Tensor | None = None,  # [B,H] or [B,K,H] hard negatives
    *,
    temperature: float = 0.05,
    false_negative_mask: torch.Tensor | None = None,  # [B, B*(1+K)] bool, True = leave out
    similarity: Similarity = "cosine",
) -> torch.Tensor:  # [B]
    r"""InfoNCE with in-batch negatives (MultipleNegativesRankingLoss), plus optional hard negatives.

    van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding"
    (arXiv:1807.03748), Eq. 4, in the in-batch form of Henderson et al. 2017 (arXiv:1705.00652,
    §4.4) used for sentence embeddings:

    .. math:: \ell_i = -\log \frac{e^{s(a_i, p_i)/\tau}}{\sum_{c \in C} e^{s(a_i, c)/\tau}}

    where the candidates :math:`C` are every positive in the batch and every hard negative
    (Karpukhin et al. 2020, DPR, arXiv:2004.04906, §3.2). ``temperature`` :math:`\tau = 0.05`
    is sentence-transformers' ``scale = 20``.

    Departure: candidates flagged in ``false_negative_mask`` (duplicates of the own positive, see
    `duplicate_text_mask`) are removed from the denominator instead of being pushed away.

    Returns the per-anchor losses ``[B]``; the caller takes the mean.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch_size = anchors.shape[0]
    candidates = torch.cat([positives, *_as_columns(negatives, batch_size)])  # [B*(1+K), H]
    logits = _similarity_matrix(anchors, candidates, similarity)  # [B, B*(1+K)]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    if false_negative_mask is not None:
        if false_negative_mask.shape != logits.shape:
            raise ValueError(f"false_negative_mask must be {tuple(logits.shape)}, got {tuple(false_negative_mask.shape)}")
        own = torch.arange(batch_size, device=logits.device)
        if false_negative_mask[own, own].any():
            raise ValueError("false_negative_mask must not mask an anchor's own positive (the diagonal)")
        logits = logits.masked_fill(false_negative_mask, float("-inf"))
    positive_logits = logits[torch.arange(batch_size, device=logits.device), torch.arange(batch_size, device=logits.device)]
    return torch.logsumexp(logits, dim=-1) - positive_logits


def triplet_distance(a: torch.Tensor, b: torch.Tensor, distance: TripletDistance = "euclidean") -> torch.Tensor:
    """Row-wise distance `[B]` between `[B,H]` tensors: Euclidean norm of the difference, or 1 - cosine."""
    if distance == "euclidean":
        # vector_norm's gradient at a zero difference is 0 (not the NaN of sqrt(sum(d^2))).
        return torch.linalg.vector_norm(a - b, dim=-1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1)
    raise ValueError(f"unknown triplet distance {distance!r}; expected one of {', '.join(TRIPLET_DISTANCES)}")


def triplet_loss(
    anchors: torch.Tensor,  # [B,H]
    positives: torch.Tensor,  # [B,H]
    negatives: torch.Tensor,  # [B,H]
    *,
    margin: float = 0.5,
    distance: TripletDistance = "euclidean",
) -> torch.Tensor:  # [B]
    r"""Triplet margin loss on true distances.

    Schroff et al. 2015, "FaceNet" (arXiv:1503.03832), Eq. 1-3, as used for sentence embeddings
    by Reimers & Gurevych 2019 (Sentence-BERT, arXiv:1908.10084, §3):

    .. math:: \ell_i = \max(0,\; d(a_i, p_i) - d(a_i, n_i) + \epsilon)

    with :math:`d` the Euclidean distance or the cosine distance :math:`1 - \cos`. Distances are
    true (non-negative) distances: the loss is zero once the negative is at least ``margin``
    further from the anchor than the positive. sentence-transformers 6.2's ``TripletLoss`` computes
    the same (its EUCLIDEAN metric negates a negative-distance similarity); the test checks both.

    Departure: the default margin is 0.5, not sentence-transformers' 5, because pmetal normalizes
    embeddings by default and unit vectors are at most 2 apart (a margin of 5 never lets the loss
    reach zero).

    Returns the per-triplet losses ``[B]``.
    """
    d_pos = triplet_distance(anchors, positives, distance)  # [B]
    d_neg = triplet_distance(anchors, negatives, distance)  # [B]
    return F.relu(d_pos - d_neg + margin)


def cosent_loss(
    emb_a: torch.Tensor,  # [B,H]
    emb_b: torch.Tensor,  # [B,H]
    scores: torch.Tensor,  # [B] gold similarity of each pair (any scale: only the order is used)
    *,
    scale: float = 20.0,
) -> torch.Tensor:  # [] scalar
    r"""CoSENT: a ranking loss on the cosine similarities of scored pairs.

    Su 2022, "CoSENT: a more efficient sentence vector scheme than Sentence-BERT"
    (https://kexue.fm/archives/8847), published as Huang et al. 2024 (IEEE/ACM TASLP,
    doi:10.1109/TASLP.2024.3402087), Eq. 6:

    .. math:: \mathcal{L} = \log\Big(1 + \sum_{(i,j):\, y_i > y_j} e^{\lambda(\cos_j - \cos_i)}\Big)

    where :math:`\cos_k = \cos(a_k, b_k)` and :math:`\lambda` = ``scale``. Pairs with tied scores
    contribute nothing, so all-equal scores give exactly 0 with zero gradient; the sum is a
    ``logsumexp`` with the leading 1 as :math:`e^0`, finite for any finite input.

    Returns one scalar for the batch (the loss couples every pair of rows).
    """
    cos = F.cosine_similarity(emb_a, emb_b, dim=-1)  # [B]
    if cos.dtype in (torch.float16, torch.bfloat16):
        cos = cos.float()
    scores = scores.to(cos.dtype).reshape(-1)
    if scores.shape != cos.shape:
        raise ValueError(f"scores must have one value per pair ({cos.shape[0]}), got shape {tuple(scores.shape)}")
    diff = scale * (cos.unsqueeze(0) - cos.unsqueeze(1))  # [B,B]: diff[i,j] = lambda (cos_j - cos_i)
    ordered = scores.unsqueeze(1) > scores.unsqueeze(0)  # [B,B]: y_i > y_j
    terms = torch.where(ordered, diff, torch.full_like(diff, float("-inf"))).reshape(-1)
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)
