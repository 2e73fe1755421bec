"""Policy-gradient losses for online RL on language models: GRPO, Dr. GRPO, DAPO.

Pure functions on tensors: group-relative advantages from scalar rewards, and the clipped
surrogate over per-token log-probabilities. No model, no sampling, no module here.

Layout: a rollout batch holds ``N = P * G`` completions, the ``G`` completions of each of ``P``
prompts next to each other (rows ``g*G .. g*G+G-1`` are one group). Per-token tensors are
``[N, L]``, aligned with the completion tokens, with ``mask`` 1 on real completion tokens
(the stop token included) and 0 on padding.
"""

from __future__ import annotations

from typing import Literal

import torch

AdvantageScale = Literal["group", "batch", "none"]
GrpoLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
ImportanceSamplingLevel = Literal["token", "sequence"]

# Added to the std before dividing, as TRL does: a group whose rewards barely differ gets large
# but finite advantages, and a group with equal rewards gets exactly 0.
ADVANTAGE_EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor,  # [N] one scalar reward per completion, groups contiguous
    group_size: int,
    *,
    scale: AdvantageScale = "group",
) -> torch.Tensor:  # [N]
    r"""Group-relative advantages: each reward minus its group's mean, optionally scaled.

    GRPO, Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300), §4.1.2 outcome supervision:
    :math:`\hat A_i = (r_i - \mathrm{mean}(\mathbf r)) / \mathrm{std}(\mathbf r)` over the ``G``
    completions of the same prompt, the same advantage for every token of completion ``i``.

    - ``scale="group"``: divide by the group's std (the paper). The std is the unbiased sample
      std (Bessel's correction), and ``1e-4`` is added to it, as in TRL.
    - ``scale="batch"``: divide by the std over the whole batch (the group mean is still
      subtracted), a middle ground reported in "Tricks or Traps? A Deep Dive into RL for LLM
      Reasoning" (Liu et al. 2025, arXiv:2508.08221).
    - ``scale="none"``: no division: Dr. GRPO, Liu et al. 2025 ("Understanding R1-Zero-Like
      Training", arXiv:2503.20783), §3.1, which removes the std to avoid weighting easy and
      hard questions differently.

    Args:
        rewards: ``[N]`` rewards, ``N`` a multiple of ``group_size``, each group contiguous.
        group_size: ``G``, the number of completions per prompt.
        scale: ``"group"``, ``"batch"`` or ``"none"`` (see above).

    Returns:
        ``[N]`` advantages in the dtype of ``rewards``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # [P, G]
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # [N]
    if scale == "none":
        return centered
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        std = std.expand_as(grouped).reshape(-1)  # [N]
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; expected 'group', 'batch' or 'none'")
    return centered / (std + ADVANTAGE_EPS)


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [P] bool
    """Which groups have all rewards equal (zero advantage: no learning signal).

    DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, Eq. 11) drops these groups.
    """
    grouped = rewards.view(-1, group_size)  # [P, G]
    return (grouped.max(dim=1).values - grouped.min(dim=1).values).abs() <= 1e-6


def grpo_loss(
    logps: torch.Tensor,  # [N, L] log pi_theta(o_t | q, o_<t) of the sampled tokens, with grad
    old_logps: torch.Tensor,  # [N, L] the same under the policy that sampled them (no grad)
    advantages: torch.Tensor,  # [N] one advantage per completion
    mask: torch.Tensor,  # [N, L] 1 on completion tokens, 0 on padding
    *,
    ref_logps: torch.Tensor | None = None,  # [N, L] under the reference policy, needed if beta > 0
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: GrpoLossType = "grpo",
    max_completion_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    importance_sampling_level: ImportanceSamplingLevel = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clipped surrogate policy loss of GRPO and its variants, with an optional k3 KL penalty.

    Per token, with the ratio :math:`\rho_t = \exp(\log\pi_\theta - \log\pi_{old})`:

    .. math::
        \ell_t = -\min\big(\rho_t \hat A,\ \mathrm{clip}(\rho_t, 1-\varepsilon_{low}, 1+\varepsilon_{high})\,\hat A\big)
                 + \beta\, D_t, \qquad
        D_t = \frac{\pi_{ref}}{\pi_\theta} - \log\frac{\pi_{ref}}{\pi_\theta} - 1

    the PPO clip (Schulman et al. 2017) with DeepSeekMath's GRPO objective (arXiv:2402.03300,
    Eq. 3) and its unbiased "k3" KL estimator (Eq. 4). ``epsilon_high > epsilon_low`` is DAPO's
    clip-higher (Yu et al. 2025, arXiv:2503.14476, Eq. 10). The KL term is added per token before
    aggregation (as in the paper and TRL). The tokens are then aggregated by ``loss_type``:

    - ``"grpo"``: mean over each sequence's tokens, then mean over sequences (GRPO Eq. 3).
    - ``"bnpo"``: mean over all tokens of *this call* (TRL's "bnpo": a micro-batch normalizes by
      its own tokens; the caller averages the micro-batch losses).
    - ``"dr_grpo"``: sum over tokens / (sequences x ``max_completion_length``): Dr. GRPO
      (arXiv:2503.20783, Eq. 4), a constant normalizer with no length bias.
    - ``"dapo"``: sum over tokens / the number of tokens of the *whole* rollout batch: DAPO's
      token-level policy-gradient loss (arXiv:2503.14476, Eq. 8 / §3.3).

    ``importance_sampling_level="sequence"`` is GSPO (Zheng et al. 2025, "Group Sequence Policy
    Optimization", arXiv:2507.18071, Eq. 7): one ratio per completion, the geometric mean of its
    token ratios, :math:`s_i = \exp(\frac{1}{|o_i|}\sum_t \log\frac{\pi_\theta}{\pi_{old}})`, clipped
    and multiplied by the advantage for every token of the completion (TRL's definition; with
    ``loss_type="grpo"`` the per-sequence mean is then GSPO's objective exactly).

    Micro-batching: when one call sees part of a rollout batch, pass ``num_sequences`` (the
    batch's number of completions, for ``grpo`` and ``dr_grpo``) and ``num_tokens`` (its number
    of completion tokens, for ``dapo``); then the micro-batch losses *sum* to the full-batch loss.
    Without them, the call's own sequences and tokens are the batch.

    Args:
        logps: ``[N, L]`` current per-token log-probs of the sampled tokens (carries the gradient).
        old_logps: ``[N, L]`` per-token log-probs at sampling time (treated as constants).
        advantages: ``[N]`` per-completion advantages (treated as constants).
        mask: ``[N, L]`` completion-token mask.
        ref_logps: ``[N, L]`` reference log-probs, required when ``beta > 0``.
        beta: KL coefficient; 0 skips the reference entirely.
        epsilon_low: lower clip range, the ratio is clipped below at ``1 - epsilon_low``.
        epsilon_high: upper clip range, clipped above at ``1 + epsilon_high``.
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"``.
        max_completion_length: the generation limit ``L_max``, required by ``"dr_grpo"``.
        num_sequences: completions in the whole rollout batch (micro-batching, see above).
        num_tokens: completion tokens in the whole rollout batch (micro-batching, see above).
        importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO), see above.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached scalar metrics: ``kl`` (mean k3 KL over
        tokens, only when ``beta > 0``), ``ratio`` (mean importance ratio), ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (TRL's names: fractions of tokens whose
        clipped term is the one in effect: ratio below ``1-epsilon_low`` with a negative advantage,
        above ``1+epsilon_high`` with a positive one, and either).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (its constant normalizer)")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference policy's per-token log-probs)")
    if not (logps.shape == old_logps.shape == mask.shape):
        raise ValueError(
            f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask {tuple(mask.shape)} must match"
        )

    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; expected 'token' or 'sequence'")
    mask = mask.to(logps.dtype)
    adv = advantages.detach().to(logps.dtype).unsqueeze(1)  # [N, 1]
    log_ratio = logps - old_logps.detach()  # [N, L]
    if importance_sampling_level == "sequence":  # GSPO: the length-normalized sequence ratio on every token
        log_ratio = ((log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0))
        log_ratio = log_ratio.expand_as(logps)
    ratio = torch.exp(log_ratio)  # [N, L]
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)  # [N, L]
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [N, L]

    metrics: dict[str, torch.Tensor] = {}
    token_count = mask.sum().clamp(min=1.0)
    if beta != 0.0:
        ref_minus_policy = ref_logps.detach() - logps  # [N, L]
        per_token_kl = torch.exp(ref_minus_policy) - ref_minus_policy - 1.0  # [N, L], k3 >= 0
        per_token = per_token + beta * per_token_kl
        metrics["kl"] = ((per_token_kl * mask).sum() / token_count).detach()

    masked = per_token * mask  # [N, L]
    batch_sequences = float(num_sequences if num_sequences is not None else logps.shape[0])
    if loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [N]
        loss = per_sequence.sum() / batch_sequences
    elif loss_type == "bnpo":
        loss = masked.sum() / token_count
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (batch_sequences * max_completion_length)
    else:  # dapo
        loss = masked.sum() / (max(float(num_tokens), 1.0) if num_tokens is not None else token_count)

    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (adv < 0)  # [N, L]
        high = (ratio > 1.0 + epsilon_high) & (adv > 0)  # [N, L]
        metrics["ratio"] = (ratio * mask).sum() / token_count
        metrics["clip_ratio/low_mean"] = (low.to(mask.dtype) * mask).sum() / token_count
        metrics["clip_ratio/high_mean"] = (high.to(mask.dtype) * mask).sum() / token_count
        metrics["clip_ratio/region_mean"] = ((low | high).to(mask.dtype) * mask).sum() / token_count
    return loss, metrics
