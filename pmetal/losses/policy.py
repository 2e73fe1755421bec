"""Policy-gradient losses for online RL on language models: GRPO, Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++.

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
AdvantageEstimator = Literal["grpo", "rloo", "reinforce_pp"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp")
GrpoLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
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
    grouped = _check_groups(rewards, group_size)  # [P, G]
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


def _check_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [P, G]
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:  # [N]
    r"""REINFORCE with a leave-one-out baseline (RLOO; Kool et al. 2019, Ahmadian et al. 2024,
    "Back to Basics", arXiv:2402.14740, Eq. 5): each completion's baseline is the mean reward of
    the *other* completions of its prompt,

    .. math:: \hat A_i = r_i - \frac{1}{G-1}\sum_{j \ne i} r_j = \frac{G}{G-1}\,(r_i - \bar r),

    an unbiased baseline (it does not depend on the completion it is subtracted from). Needs
    ``G >= 2``. Returns ``[N]`` advantages in the dtype of ``rewards``.
    """
    grouped = _check_groups(rewards, group_size)  # [P, G]
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 completions per prompt")
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [P, G]
    return (grouped - others).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor) -> torch.Tensor:  # [N]
    r"""REINFORCE++'s advantages (Hu et al. 2025, arXiv:2501.03262, §3.2): the rewards normalized
    over the whole batch, :math:`\hat A_i = (r_i - \mathrm{mean}(\mathbf r)) / \mathrm{std}(\mathbf r)`,
    with no per-prompt baseline (the paper's argument: a global normalization is less biased
    towards easy prompts than a group's).

    Departures: the paper folds a per-token KL penalty into the reward before normalizing; here the
    KL to the reference stays in the loss (``grpo_loss``'s ``beta``, the k3 estimator), as GRPO
    does. The std is the unbiased sample std plus ``ADVANTAGE_EPS``, as in ``group_advantages``.
    REINFORCE++-baseline (the group mean subtracted first) is ``group_advantages(scale="batch")``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    centered = rewards - rewards.mean()
    std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    return centered / (std + ADVANTAGE_EPS)


def estimate_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    estimator: AdvantageEstimator = "grpo",
    scale: AdvantageScale = "group",
) -> torch.Tensor:  # [N]
    """The advantages of a rollout batch by ``estimator``: ``"grpo"`` (``group_advantages`` with
    ``scale``), ``"rloo"`` (``rloo_advantages``, then divided by the group's or the batch's std
    when ``scale`` asks for it, as TRL's ``normalize_advantages``), or ``"reinforce_pp"``
    (``reinforce_pp_advantages``, always normalized over the batch; ``scale`` is not used)."""
    if estimator == "grpo":
        return group_advantages(rewards, group_size, scale=scale)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards)
    if estimator != "rloo":
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    advantages = rloo_advantages(rewards, group_size)
    if scale == "none":
        return advantages
    if scale == "group":
        std = rewards.view(-1, group_size).std(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; expected 'group', 'batch' or 'none'")
    return advantages / (std + ADVANTAGE_EPS)


def needs_whole_batch(estimator: str, scale: str) -> bool:
    """Whether the advantages of a group depend on other groups' rewards (so scoring chunk by chunk
    must wait for the whole batch): a batch std, or REINFORCE++'s batch normalization."""
    return scale == "batch" or estimator == "reinforce_pp"


def high_entropy_mask(
    entropies: torch.Tensor,  # [N, L] the policy's per-token entropy
    mask: torch.Tensor,  # [N, L] 1 on completion tokens
    top_fraction: float,
) -> torch.Tensor:  # [N, L] bool
    """The completion tokens whose entropy is in the top ``top_fraction`` of this batch's tokens.

    Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for
    LLM Reasoning" (arXiv:2506.01939), §4: the policy gradient is kept on the highest-entropy
    ~20% of tokens (the "forking" tokens) only. The threshold is the ``1 - top_fraction``
    quantile of the entropies of the real tokens (ties at the threshold are kept), so
    ``top_fraction=1`` keeps every token.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction={top_fraction}: expected a fraction in (0, 1]")
    real = mask.bool()
    if top_fraction == 1.0 or not real.any():
        return real
    threshold = torch.quantile(entropies[real].float(), 1.0 - top_fraction)
    return real & (entropies >= threshold)


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
    sampling_logps: torch.Tensor | None = None,  # [N, L] the sampler's log-probs, with tis_cap
    tis_cap: float | None = None,
    entropy_mask: torch.Tensor | None = None,  # [N, L] bool: tokens whose policy term is kept
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

    ``loss_type="cispo"`` is CISPO (MiniMax-M1, arXiv:2506.13585, Eq. 4-5): the importance weight
    itself is clipped and detached, and multiplies a REINFORCE term,
    :math:`\ell_t = -\mathrm{sg}(\min(\rho_t, 1+\varepsilon_{high}))\,\hat A\,\log\pi_\theta`,
    so every token keeps a gradient (PPO's clip zeroes those outside the range), aggregated over
    the tokens of the whole batch as ``"dapo"`` is (the paper's normalizer). At ``rho = 1`` its
    gradient equals the clipped surrogate's. As in the paper's experiments there is no lower clip
    (``epsilon_low`` is not used). Departure from TRL: TRL's ``epsilon_high`` is the cap itself;
    here the cap is ``1 + epsilon_high``, the meaning ``epsilon_high`` has for every other type.

    Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training"): when the sampler's numerics differ from the trainer's, ``old_logps``
    are the *trainer's* log-probs of the sampled tokens before the update, ``sampling_logps`` the
    sampler's, and each token's policy term is multiplied by
    :math:`\min(\pi_{old}/\pi_{sampler}, C)` with ``C = tis_cap`` (a constant weight).
    ``entropy_mask`` keeps the policy term of the selected tokens only (``high_entropy_mask``);
    the KL term, when ``beta > 0``, stays on every token. Order as in TRL: surrogate, entropy
    mask, importance weight, then the KL term.

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
        sampling_logps: ``[N, L]`` the sampler's log-probs, required with ``tis_cap``.
        tis_cap: the cap ``C`` of the truncated importance weight; None: no correction.
        entropy_mask: ``[N, L]`` bool, the tokens whose policy term is kept; None: every token.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached scalar metrics: ``kl`` (mean k3 KL over
        tokens, only when ``beta > 0``), ``ratio`` (mean importance ratio), ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (TRL's names: fractions of tokens whose
        clipped term is the one in effect: ratio below ``1-epsilon_low`` with a negative advantage,
        above ``1+epsilon_high`` with a positive one, and either; under ``"cispo"`` the fraction of
        tokens whose weight was capped, whatever the advantage's sign, is the high and region one), ``tis/weight_mean`` and
        ``tis/truncated_fraction`` with ``tis_cap``, ``entropy/kept_fraction`` with ``entropy_mask``.
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

    if tis_cap is not None and (sampling_logps is None or tis_cap <= 0):
        raise ValueError("tis_cap needs sampling_logps (the sampler's per-token log-probs) and a cap > 0")
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
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=1.0 + epsilon_high).detach() * adv * logps  # [N, L]
    else:
        per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [N, L]

    metrics: dict[str, torch.Tensor] = {}
    token_count = mask.sum().clamp(min=1.0)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(per_token.dtype)
        metrics["entropy/kept_fraction"] = ((entropy_mask.to(mask.dtype) * mask).sum() / token_count).detach()
    if tis_cap is not None:
        raw_weight = torch.exp(old_logps.detach() - sampling_logps.detach())  # [N, L]
        per_token = per_token * torch.clamp(raw_weight, max=tis_cap)
        metrics["tis/weight_mean"] = (torch.clamp(raw_weight, max=tis_cap) * mask).sum() / token_count
        metrics["tis/truncated_fraction"] = ((raw_weight > tis_cap).to(mask.dtype) * mask).sum() / token_count
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
    else:  # dapo, cispo: over the tokens of the whole rollout batch
        loss = masked.sum() / (max(float(num_tokens), 1.0) if num_tokens is not None else token_count)

    with torch.no_grad():
        high = ratio > 1.0 + epsilon_high  # [N, L]
        if loss_type == "cispo":  # only the weight's upper cap, whatever the advantage's sign
            low = torch.zeros_like(high)
        else:  # the clipped term is in effect only on the side of the advantage
            low, high = (ratio < 1.0 - epsilon_low) & (adv < 0), high & (adv > 0)
        metrics["ratio"] = (ratio * mask).sum() / token_count
        metrics["clip_ratio/low_mean"] = (low.to(mask.dtype) * mask).sum() / token_count
        metrics["clip_ratio/high_mean"] = (high.to(mask.dtype) * mask).sum() / token_count
        metrics["clip_ratio/region_mean"] = ((low | high).to(mask.dtype) * mask).sum() / token_count
    return loss, metrics
