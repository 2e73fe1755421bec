r"""Distillation losses: the generalized Jensen-Shannon divergence between token distributions.

GKD, Agarwal et al. 2024 ("On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv:2306.13649), Eq. 1, per token, with :math:`P` the teacher,
:math:`Q_\theta` the student and the mixture :math:`M = \beta P + (1-\beta) Q_\theta` (both after
dividing the logits by ``temperature``):

.. math::
    \mathrm{JSD}(\beta) = \beta\, \mathrm{KL}(P \| M) + (1-\beta)\, \mathrm{KL}(Q_\theta \| M)

Convention (TRL's ``GKDTrainer.generalized_jsd_loss``, checked in ``tests/unit/test_distill_loss.py``
and ``tests/unit/test_policy_losses.py``):
``beta=0`` is the *forward* KL :math:`\mathrm{KL}(P \| Q_\theta)` (mode-covering: classic
knowledge distillation), ``beta=1`` the *reverse* KL :math:`\mathrm{KL}(Q_\theta \| P)`
(mode-seeking). The mixture form tends to 0 at both ends, so the ends are computed directly; in
between the mixture is formed in log space.

Two forms, the same values:

- ``jsd_loss(student_logits, teacher_logits, mask)``: on logits (small inputs, RLKD, tests).
- ``chunked_jsd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight)``: on the final
  hidden states and the LM heads. The heads run chunk by chunk of tokens (each chunk about
  ``CHUNK_ELEMENTS`` fp32 logits, so the chunk shrinks as the vocabulary grows) and the
  ``[tokens, vocab]`` logits of neither model ever exist whole. The gradient of each chunk's
  divergence with respect to the student's logits is computed in the forward pass, in closed form,
  and pushed to the hidden states and head weight there (as pmetal's chunked cross-entropy does,
  ``pmetal.losses.lm``), so backward recomputes nothing; with ``s = z / T`` the student's tempered
  logits, ``q = softmax(s)``, ``p`` the teacher's:

  - forward KL (``beta=0``): ``dD/ds = q - p``
  - reverse KL (``beta=1``): ``dD/ds = q * (log q - log p - D)``
  - mixture: ``dD/ds = (1 - beta) * q * (log q - log m - KL(q || m))`` (``dD/dq = (1 - beta) log(q / m)``
    before the softmax's Jacobian), and ``dD/dz = dD/ds / T`` (times ``1 - tanh^2`` under softcapping).

Departures from TRL: none in the divergence; like TRL there is no ``temperature**2`` factor
(Hinton et al. 2015 multiply by it to keep the gradient scale; RLKD does). The chunked form does
its per-chunk math in fp32 whatever the input dtype (fp64 for fp64 inputs), the matmuls in the
compute dtype (autocast's, else the inputs'), and also returns per-token statistics without
gradient: the student's entropy (TRL's ``entropy``) and the forward KL(teacher || student) whatever
``beta`` is (the divergence pmetal logs as ``forward_kl``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pmetal.losses.lm import (DEFAULT_CHUNK_ELEMENTS, _accumulate_grads, _acc, _final_grads, _new_grads,
                              auto_chunk_size, compute_dtype_for)

# fp32 logits per chunk: a chunk holds about eight [tokens, vocab] temporaries (both models' logits,
# log-probs, probabilities, the mixture, the gradient), so half the chunked cross-entropy's budget.
CHUNK_ELEMENTS = DEFAULT_CHUNK_ELEMENTS // 2


def _check_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probs: [..., V] -> [...]."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)


def _mixture_logp(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """log M = log(beta P + (1 - beta) Q), in log space: [..., V]."""
    return torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))


def token_divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """The generalized JSD of each position from log-probs ``[..., V]`` -> ``[...]`` (the module docstring's convention)."""
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    mixture = _mixture_logp(student_logp, teacher_logp, beta)
    return beta * _kl(teacher_logp, mixture) + (1.0 - beta) * _kl(student_logp, mixture)


def jsd_loss(
    student_logits: torch.Tensor,  # [..., V] (e.g. [B, T, V] or [N, V])
    teacher_logits: torch.Tensor,  # [..., V] same shape, no gradient needed
    mask: torch.Tensor | None = None,  # [...] 1 where the token counts (e.g. completion tokens)
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalized JSD between teacher and student logits, mean over the included tokens.

    Args:
        student_logits: ``[..., V]`` student logits (carry the gradient).
        teacher_logits: ``[..., V]`` teacher logits (treated as constants).
        mask: ``[...]`` token mask (1 = included); ``None`` includes every position.
        beta: interpolation in ``[0, 1]`` (see the module docstring's convention).
        temperature: softmax temperature applied to both distributions.

    Returns:
        Scalar: the divergence summed over the vocabulary, averaged over the included tokens
        (0 when no token is included).
    """
    _check_beta_temperature(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "the teacher must share the student's vocabulary"
        )
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)  # [..., V]
    teacher_logp = F.log_softmax(teacher_logits.detach().to(student_logp.dtype) / temperature, dim=-1)  # [..., V]
    per_token = token_divergence(student_logp, teacher_logp, beta)
    if mask is None:
        return per_token.mean() if per_token.numel() else per_token.sum()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


class ChunkedJsd(NamedTuple):
    """What `chunked_jsd_loss` returns; only `loss` carries a gradient."""

    loss: torch.Tensor  # 0-d: the mean generalized JSD over the tokens (0 without tokens)
    divergence: torch.Tensor  # [N] each token's generalized JSD
    forward_kl: torch.Tensor  # [N] each token's KL(teacher || student) at the temperature
    entropy: torch.Tensor  # [N] the student's entropy at each token, at the temperature


def _tempered(logits: torch.Tensor, softcap: float | None, temperature: float):
    """(logits after softcapping and 1/T in fp32 (fp64 stays), tanh of the softcap or None)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    return z / temperature, tanh


def divergence_logit_grad(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float,
                          divergence: torch.Tensor) -> torch.Tensor:
    """d divergence / d (tempered student logits), ``[n, V]``, in closed form (see the module docstring)."""
    q = student_logp.exp()
    if beta == 0.0:
        return q - teacher_logp.exp()
    if beta == 1.0:
        return q * (student_logp - teacher_logp - divergence.unsqueeze(1))
    log_ratio = student_logp - _mixture_logp(student_logp, teacher_logp, beta)  # log q / m
    kl_student = (q * log_ratio).sum(-1, keepdim=True)
    return (1.0 - beta) * q * (log_ratio - kl_student)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden.to(weight.dtype) @ weight.t()  # [n, V]
    return logits + bias.to(weight.dtype) if bias is not None else logits


class _ChunkedJsd(torch.autograd.Function):
    """The mean generalized JSD; the gradients are made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, beta, temperature,
                softcaps, chunk_size, dtypes, want_grads):
        needs = (want_grads and hidden.requires_grad, want_grads and weight.requires_grad,
                 want_grads and bias is not None and bias.requires_grad)
        grads = _new_grads(hidden, weight, bias, *needs)
        w, tw = weight.to(dtypes[0]), teacher_weight.to(dtypes[1])
        n_tokens = hidden.shape[0]
        stats = torch.zeros(3, n_tokens, dtype=_acc(w), device=hidden.device)  # divergence, forward KL, entropy
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_tokens, chunk_size):
                sl = slice(start, start + chunk_size)
                s, tanh = _tempered(_logits(hidden[sl], w, bias), softcaps[0], temperature)
                t, _ = _tempered(_logits(teacher_hidden[sl], tw, teacher_bias), softcaps[1], temperature)
                student_logp, teacher_logp = torch.log_softmax(s, -1), torch.log_softmax(t.to(s.dtype), -1)
                del s, t
                divergence = token_divergence(student_logp, teacher_logp, beta)
                stats[0, sl] = divergence
                stats[1, sl] = divergence if beta == 0.0 else _kl(teacher_logp, student_logp)
                stats[2, sl] = -(student_logp.exp() * student_logp).sum(-1)
                if any(needs):
                    # each token weighs 1/N in the mean
                    grad = divergence_logit_grad(student_logp, teacher_logp, beta, divergence)
                    grad = grad * (1.0 / (temperature * n_tokens))
                    if tanh is not None:
                        grad = grad * (1.0 - tanh * tanh)
                    _accumulate_grads(grad, hidden[sl], w, *grads, sl)
        ctx.save_for_backward(*_final_grads(grads, weight, bias))
        loss = stats[0].sum() / max(n_tokens, 1)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None, None, None)


def chunked_jsd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
) -> ChunkedJsd:
    """The mean generalized JSD of the tokens, from both models' hidden states and LM heads, chunked.

    Args:
        student_hidden: ``[N, H]`` the student's final hidden states at the scored positions.
        student_weight: ``[V, H]`` the student's LM-head weight (its first V rows: a padded head is cut
            to the shared vocabulary by the caller).
        teacher_hidden: ``[N, H']`` the teacher's hidden states at the same positions (no gradient).
        teacher_weight: ``[V, H']`` the teacher's LM-head weight.
        student_bias, teacher_bias: ``[V]`` the heads' biases, if any.
        beta: interpolation in ``[0, 1]``: 0 forward KL(teacher || student), 1 reverse KL.
        temperature: softmax temperature of both distributions.
        student_softcap, teacher_softcap: final-logit softcapping (Gemma 2), before the temperature.
        chunk_size: tokens per chunk; default: about ``CHUNK_ELEMENTS`` logits per chunk.

    Returns:
        ``ChunkedJsd``: the loss (0-d, fp32; fp64 for fp64 inputs; gradient to the student's hidden
        states, head weight and bias) and per-token divergence, forward KL and student entropy
        ``[N]`` without gradient. Call ``backward`` on the loss at most once.
    """
    _check_beta_temperature(beta, temperature)
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"expected hidden states [N, H] and [N, H'], got {tuple(student_hidden.shape)} and "
                         f"{tuple(teacher_hidden.shape)}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"the student's head has {student_weight.shape[0]} rows and the teacher's "
                         f"{teacher_weight.shape[0]}; the teacher must share the student's vocabulary")
    chunk = chunk_size or auto_chunk_size(student_weight.shape[0], CHUNK_ELEMENTS)
    dtypes = (compute_dtype_for(student_hidden, student_weight), compute_dtype_for(teacher_hidden, teacher_weight))
    loss, stats = _ChunkedJsd.apply(student_hidden, student_weight, student_bias, teacher_hidden.detach(),
                                    teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
                                    float(beta), float(temperature), (student_softcap, teacher_softcap), chunk,
                                    dtypes, torch.is_grad_enabled())
    return ChunkedJsd(loss, stats[0], stats[1], stats[2])
