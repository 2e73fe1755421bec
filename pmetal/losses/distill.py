"""Distillation losses: the generalized Jensen-Shannon divergence between token distributions.

Pure functions on logits; no model here. The caller computes logits only where they are needed
(the completion tokens) so the ``[tokens, vocab]`` tensors stay small.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def jsd_loss(
    student_logits: torch.Tensor,  # [..., V] (e.g. [B, T, V] or [N, V])
    teacher_logits: torch.Tensor,  # [..., V] same shape, no gradient needed
    mask: torch.Tensor | None = None,  # [...] 1 where the token counts (e.g. completion tokens)
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence between teacher and student, mean over tokens.

    GKD, Agarwal et al. 2024 ("On-Policy Distillation of Language Models", arXiv:2306.13649),
    Eq. 1, per token, with :math:`P` the teacher, :math:`Q_\theta` the student and the mixture
    :math:`M = \beta P + (1-\beta) Q_\theta` (both after dividing the logits by ``temperature``):

    .. math::
        \mathrm{JSD}(\beta) = \beta\, \mathrm{KL}(P \| M) + (1-\beta)\, \mathrm{KL}(Q_\theta \| M)

    Convention (the same as TRL's ``GKDTrainer.generalized_jsd_loss``, checked in
    ``tests/unit/test_policy_losses.py``): ``beta=0`` is the *forward* KL
    :math:`\mathrm{KL}(P \| Q_\theta)` (teacher to student, mode-covering: classic knowledge
    distillation), ``beta=1`` the *reverse* KL :math:`\mathrm{KL}(Q_\theta \| P)`
    (mode-seeking). Those two ends are computed directly (the mixture form degenerates to 0
    there); in between the mixture is formed in log space.

    Departures: none from TRL; like TRL there is no ``temperature**2`` factor (Hinton et al.
    2015 multiply by it to keep gradient scale; the caller may, see ``RlkdModule``).

    Args:
        student_logits: ``[..., V]`` student logits (carry the gradient).
        teacher_logits: ``[..., V]`` teacher logits (treated as constants).
        mask: ``[...]`` token mask (1 = included); ``None`` includes every position.
        beta: interpolation in ``[0, 1]`` (see the convention above).
        temperature: softmax temperature applied to both distributions.

    Returns:
        Scalar: the divergence summed over the vocabulary, averaged over the included tokens
        (0 when no token is included).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "the teacher must share the student's vocabulary"
        )
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)  # [..., V]
    teacher_logp = F.log_softmax(teacher_logits.detach().to(student_logp.dtype) / temperature, dim=-1)  # [..., V]

    def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:  # KL(p || q) per position, [...]
        return (p_log.exp() * (p_log - q_log)).sum(dim=-1)

    if beta == 0.0:
        per_token = kl(teacher_logp, student_logp)
    elif beta == 1.0:
        per_token = kl(student_logp, teacher_logp)
    else:
        mixture_logp = torch.logsumexp(
            torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)]), dim=0
        )  # [..., V]
        per_token = beta * kl(teacher_logp, mixture_logp) + (1.0 - beta) * kl(student_logp, mixture_logp)

    if mask is None:
        return per_token.mean() if per_token.numel() else per_token.sum()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
