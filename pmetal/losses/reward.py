"""The Bradley–Terry loss of a pairwise reward model.

Bradley & Terry (1952) model the probability that one item beats another as
σ(r_chosen − r_rejected). A reward model learns scalar scores r from human preference pairs by
maximizing the log of that probability: InstructGPT (Ouyang et al. 2022, Eq. 1),

    loss = −E[ log σ(r(x, y_w) − r(x, y_l)) ],

and Llama 2 (Touvron et al. 2023, Eq. 2) subtracts a per-pair margin m(r) inside the sigmoid, so a
pair rated far apart must be separated by more:

    loss = −E[ log σ(r(x, y_w) − r(x, y_l) − m) ].

Departures, all as TRL's `RewardTrainer` (1.16): InstructGPT averages over all K-choose-2 pairs of
one prompt in one batch element, here every pair is its own example and the loss is the batch mean;
the optional centring term `center_coefficient · mean((r_w + r_l)²)` (Eisenstein et al. 2023,
TRL's `center_rewards_coefficient`) pulls the scores towards zero mean, so rewards of different
runs share a scale (the Bradley–Terry likelihood is blind to a shift of every score).

A pure function: no model, no data; works in any dtype (float64 in tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,  # [B] r(x, y_w)
    rejected_rewards: torch.Tensor,  # [B] r(x, y_l)
    margin: torch.Tensor | None = None,  # [B] Llama 2's m(r); None: no margin
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """The scalar batch loss `−mean log σ(r_w − r_l − m) + c · mean((r_w + r_l)²)`.

    Args:
        chosen_rewards: scores of the preferred completions `[B]`.
        rejected_rewards: scores of the dispreferred completions `[B]`.
        margin: how far apart each pair must be `[B]` (Llama 2, Eq. 2); None for none.
        center_coefficient: weight of the reward-centring term; None or 0 for none.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(chosen_rewards.shape)} "
                         f"vs {tuple(rejected_rewards.shape)}")
    check_center_coefficient(center_coefficient)
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin.to(difference.dtype)
    loss = -F.logsigmoid(difference).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def check_center_coefficient(center_coefficient: float | None) -> None:
    if center_coefficient is not None and not (math.isfinite(center_coefficient) and center_coefficient >= 0):
        raise ValueError(f"center_rewards_coefficient must be a finite number >= 0, got {center_coefficient}")
