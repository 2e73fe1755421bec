"""Online preference losses: pairs chosen by a reward from two sampled completions, and XPO's bonus.

Pure functions; the DPO loss itself is `pmetal.losses.preference.dpo_loss`, applied to the pairs
these functions pick. Rows come in pairs: rows ``2p`` and ``2p + 1`` are the two completions of
prompt ``p`` (the rollout's groups of two).
"""

from __future__ import annotations

import torch


def preference_labels(rewards: torch.Tensor) -> torch.Tensor:
    r"""Each row's side in its pair: +1 chosen (the higher reward), -1 rejected, 0 a tie (both rows).

    Online DPO (Guo et al. 2024, arXiv:2402.04792, Algorithm 1) ranks the two completions of a
    prompt by the annotator; here the annotator is a reward. A pair with equal rewards teaches no
    preference and is dropped (labels 0). Departure from TRL's OnlineDPOTrainer, which keeps a
    tie and calls its first completion chosen.

    Args:
        rewards: ``[2P]`` rewards, the two completions of prompt ``p`` at rows ``2p`` and ``2p + 1``.

    Returns:
        ``[2P]`` labels in the rewards' dtype.
    """
    if rewards.dim() != 1 or rewards.numel() % 2:
        raise ValueError(f"expected [2P] rewards (two completions per prompt), got shape {tuple(rewards.shape)}")
    first, second = rewards.view(-1, 2).unbind(-1)  # [P] each
    sign = torch.sign(first - second)  # +1: the first is chosen, -1: the second, 0: a tie
    return torch.stack([sign, -sign], dim=-1).reshape(-1).to(rewards.dtype)


def pair_indices(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [K], rejected [K])`` row indices of the untied pairs of ``[2P]`` labels (`preference_labels`)."""
    pairs = labels.view(-1, 2)  # [P, 2]
    kept = pairs[:, 0] != 0
    first = torch.arange(0, labels.numel(), 2, device=labels.device)[kept]  # [K] the pair's first row
    first_chosen = pairs[kept, 0] > 0
    chosen = torch.where(first_chosen, first, first + 1)
    rejected = torch.where(first_chosen, first + 1, first)
    return chosen, rejected


def xpo_losses(dpo_losses: torch.Tensor, policy_logps_of_reference_samples: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""XPO's per-pair loss: the DPO loss plus the exploration term.

    Xie et al. 2024, "Exploratory Preference Optimization" (arXiv:2405.21046), Algorithm 1: with
    :math:`y \sim \pi_\theta` and :math:`\tilde y \sim \pi_{ref}` the two completions of a prompt,

    .. math:: \ell = \ell_{DPO}(y_w, y_l) + \alpha \log\pi_\theta(\tilde y \mid x)

    (summed log-probs). Minimizing :math:`\alpha\log\pi_\theta(\tilde y)` lowers the policy's
    probability of what the reference would say, which pushes it to explore outside the
    reference's support (the paper's optimism). TRL's XPOTrainer adds the same term.

    Args:
        dpo_losses: ``[P]`` DPO losses of the pairs.
        policy_logps_of_reference_samples: ``[P]`` summed policy log-probs of the reference's completions.
        alpha: the weight of the exploration term (>= 0).

    Returns:
        ``[P]`` losses.
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha}: XPO's exploration weight must be >= 0")
    return dpo_losses + alpha * policy_logps_of_reference_samples
