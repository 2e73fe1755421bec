"""Preference-optimization losses: DPO (and its sigmoid/hinge/IPO/robust variants), SimPO, ORPO, KTO.

Pure functions on per-sequence completion log-probabilities; no model, no module, no data here.
Every function works in whatever dtype it is given (float64 in tests, float32/bf16 in training)
and returns per-example losses `[B]`, so the caller chooses the reduction.

Log-probabilities are *summed* over the completion tokens unless an argument is named `*_avg_*`,
in which case they are the per-token mean (the length-normalized form SimPO, ORPO and IPO use).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

DpoLossType = Literal["sigmoid", "hinge", "ipo", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "robust")

# ORPO's odds need log(1 - p); at p = 1 (an average log-prob of exactly 0, which float32
# log-softmax can return for a fully confident model) the odds are infinite. Clamping the
# argument of log1mexp to at most -1e-6 (p <= 0.999999) keeps the loss and its gradient finite.
_ORPO_MAX_AVG_LOGP = -1e-6


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # [B] summed log pi_theta(y_w | x)  (avg for "ipo")
    policy_rejected_logps: torch.Tensor,  # [B] summed log pi_theta(y_l | x)  (avg for "ipo")
    ref_chosen_logps: torch.Tensor,  # [B] summed log pi_ref(y_w | x)  (avg for "ipo")
    ref_rejected_logps: torch.Tensor,  # [B] summed log pi_ref(y_l | x)  (avg for "ipo")
    *,
    beta: float = 0.1,
    loss_type: DpoLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Direct Preference Optimization loss and its variants.

    With the log-ratio margin
    :math:`h = (\log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)) - (\log\pi_\theta(y_l|x) - \log\pi_{ref}(y_l|x))`:

    - ``"sigmoid"``: DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7:
      :math:`-\log\sigma(\beta h)`. With ``label_smoothing`` :math:`\epsilon > 0` it is conservative
      DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the labels are flipped
      with probability :math:`\epsilon`, giving
      :math:`-(1-\epsilon)\log\sigma(\beta h) - \epsilon\log\sigma(-\beta h)`.
    - ``"hinge"``: the SLiC-HF calibration loss (Zhao et al. 2023, arXiv:2305.10425, Eq. 1) on
      DPO's log-ratios, as in Rafailov et al. §7 / TRL: :math:`\max(0, 1 - \beta h)`.
    - ``"ipo"``: IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17:
      :math:`(h - \frac{1}{2\beta})^2` with :math:`\beta` as the paper's :math:`\tau`. The
      log-probs must be the per-token *averages* over each completion (the length-normalized
      form the IPO authors report, and TRL uses), so the squared loss does not grow with length.
    - ``"robust"``: robust DPO (rDPO), Chowdhury et al. 2024 (arXiv:2403.00409), Eq. 5, an
      unbiased estimate of the clean DPO loss under label noise rate :math:`\epsilon` < 0.5:
      :math:`\frac{(1-\epsilon)\,(-\log\sigma(\beta h)) - \epsilon\,(-\log\sigma(-\beta h))}{1 - 2\epsilon}`.

    Args:
        policy_chosen_logps: policy log-probs of the chosen completions, ``[B]``.
        policy_rejected_logps: policy log-probs of the rejected completions, ``[B]``.
        ref_chosen_logps: reference log-probs of the chosen completions, ``[B]``.
        ref_rejected_logps: reference log-probs of the rejected completions, ``[B]``.
        beta: the KL-penalty strength (DPO's :math:`\beta`, IPO's :math:`\tau`).
        loss_type: one of ``"sigmoid"``, ``"hinge"``, ``"ipo"``, ``"robust"``.
        label_smoothing: the assumed rate of flipped labels; used by ``"sigmoid"`` (cDPO) and
            ``"robust"`` (rDPO), must be 0 for ``"hinge"`` and ``"ipo"``.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` where the rewards are the
        implicit rewards :math:`\beta(\log\pi_\theta - \log\pi_{ref})`, detached (for logging).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing is not defined for loss_type {loss_type!r}; use 'sigmoid' or 'robust'")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    margin = chosen_logratios - rejected_logratios  # [B] h

    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
            -beta * margin
        )
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:  # robust
        clean = -F.logsigmoid(beta * margin)
        flipped = -F.logsigmoid(-beta * margin)
        losses = ((1.0 - label_smoothing) * clean - label_smoothing * flipped) / (1.0 - 2.0 * label_smoothing)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    chosen_avg_logps: torch.Tensor,  # [B] mean over completion tokens of log pi_theta(y_w | x)
    rejected_avg_logps: torch.Tensor,  # [B] mean over completion tokens of log pi_theta(y_l | x)
    *,
    beta: float = 2.5,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""SimPO: reference-free preference loss with length-normalized rewards.

    Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (arXiv:2405.14734), Eq. 6:

    .. math:: -\log\sigma\Big(\tfrac{\beta}{|y_w|}\log\pi_\theta(y_w|x)
              - \tfrac{\beta}{|y_l|}\log\pi_\theta(y_l|x) - \gamma\Big),
              \qquad \gamma = \text{gamma\_beta\_ratio}\cdot\beta.

    The target margin is given as the ratio :math:`\gamma/\beta` because that is how the paper
    tunes it (Table 7: :math:`\gamma/\beta \in [0, 1]`, 0.5 by default). ``label_smoothing``
    :math:`\epsilon` applies the cDPO-style smoothing that TRL's CPO trainer offers:
    :math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)`.

    Args:
        chosen_avg_logps: per-token mean policy log-probs of the chosen completions, ``[B]``.
        rejected_avg_logps: per-token mean policy log-probs of the rejected completions, ``[B]``.
        beta: reward scale :math:`\beta` (the paper uses 2.0 to 2.5).
        gamma_beta_ratio: target reward margin as a fraction of beta, :math:`\gamma/\beta`.
        label_smoothing: assumed rate of flipped labels, in ``[0, 0.5)``.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with rewards
        :math:`\beta\cdot\text{avg log-prob}`, detached.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    gamma = gamma_beta_ratio * beta
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # [B]
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Mächler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor,  # [B] mean over completion tokens of log pi_theta(y_w | x)
    rejected_avg_logps: torch.Tensor,  # [B] mean over completion tokens of log pi_theta(y_l | x)
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""ORPO's odds-ratio term (the module adds the chosen completion's NLL).

    Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (arXiv:2403.07691). With :math:`P(y|x) = \exp(\frac{1}{|y|}\log\pi_\theta(y|x))` (Eq. 3),
    :math:`\text{odds}(y|x) = P/(1-P)` (Eq. 4), Eq. 7:

    .. math:: \mathcal{L}_{OR} = -\log\sigma\Big(\log\frac{\text{odds}(y_w|x)}{\text{odds}(y_l|x)}\Big),
       \qquad \log\frac{\text{odds}_w}{\text{odds}_l} = (a_w - a_l) - (\log(1-e^{a_w}) - \log(1-e^{a_l}))

    for average log-probs :math:`a`, computed with a stable log1mexp, weighted by :math:`\beta`
    (the paper's :math:`\lambda`, Eq. 6): the returned losses are :math:`\beta\mathcal{L}_{OR}`.
    Departure: the argument of log1mexp is clamped at -1e-6 so that a completion the model is
    certain of (average log-prob exactly 0) gives a finite loss.

    Args:
        chosen_avg_logps: per-token mean policy log-probs of the chosen completions, ``[B]``.
        rejected_avg_logps: per-token mean policy log-probs of the rejected completions, ``[B]``.
        beta: weight :math:`\lambda` of the odds-ratio term against the NLL term.

    Returns:
        ``(losses [B], log_odds [B])``: :math:`-\beta\log\sigma(\text{log odds ratio})` and the log
        odds ratio itself (detached, for logging).
    """
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        _log1mexp(chosen_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP))
        - _log1mexp(rejected_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP))
    )  # [B]
    losses = -beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def kto_loss(
    policy_logps: torch.Tensor,  # [B] summed log pi_theta(y | x)
    ref_logps: torch.Tensor,  # [B] summed log pi_ref(y | x)
    desirable: torch.Tensor,  # [B] bool: True = desirable (good) completion
    kl: torch.Tensor | float,  # scalar: the reference point z_0 (detached here)
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""KTO: Kahneman-Tversky Optimization on unpaired desirable/undesirable completions.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv:2402.01306), Eq. 7/8. With :math:`r = \log\pi_\theta(y|x) - \log\pi_{ref}(y|x)` and the
    reference point :math:`z_0 = \mathrm{KL}(\pi_\theta\|\pi_{ref})` (treated as a constant):

    .. math:: \mathcal{L} = \lambda_y - v(x,y),\quad
              v = \begin{cases}\lambda_D\,\sigma(\beta(r - z_0)) & y \text{ desirable}\\
                                \lambda_U\,\sigma(\beta(z_0 - r)) & y \text{ undesirable}\end{cases}

    i.e. :math:`\lambda_D(1 - \sigma(\beta(r - z_0)))` or :math:`\lambda_U(1 - \sigma(\beta(z_0 - r)))`
    per row. The caller estimates :math:`z_0` (the module: mean log-ratio of mismatched
    prompt/completion pairs in the batch, clamped at 0, as in the paper's §4.2 and TRL).

    Args:
        policy_logps: policy log-probs of each completion, ``[B]``.
        ref_logps: reference log-probs of each completion, ``[B]``.
        desirable: ``[B]`` bool, whether each completion is desirable.
        kl: the reference point :math:`z_0` (a scalar tensor or float); gradients never flow into it.
        beta: :math:`\beta`, the risk-aversion / KL strength.
        desirable_weight: :math:`\lambda_D`.
        undesirable_weight: :math:`\lambda_U`.

    Returns:
        ``(losses [B], rewards [B])`` in the input's row order; rewards are :math:`\beta r`, detached.
    """
    logratios = policy_logps - ref_logps  # [B] r
    z0 = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
    desirable = desirable.to(device=logratios.device, dtype=torch.bool)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # [B]
    return losses, beta * logratios.detach()
