"""Online DPO's pairs from rewards and XPO's exploration term: hand-worked values and TRL's formulas.

TRL's OnlineDPOTrainer (trl.experimental.online_dpo, 1.16) computes its loss inside `training_step`
after generating, and XPOTrainer is no longer shipped in TRL 1.16 (it was in trl/trainer/xpo_trainer.py
up to 0.2x): there is no standalone function to call, so `_trl_online_dpo` and `_trl_xpo` below
restate their formulas as read in that source (pairing `first_half >= second_half`, the summed
log-ratios, `-logsigmoid(beta * logits)` / `(logits - 1 / (2 beta))^2`, and XPO's
`alpha * model_logprobs_ref_data_sum` added before the mean).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pmetal.losses.online_preference import pair_indices, preference_labels, xpo_losses
from pmetal.losses.preference import dpo_loss


def test_labels_and_pairs_by_hand():
    rewards = torch.tensor([1.0, 0.5, 0.2, 0.9, 0.3, 0.3], dtype=torch.float64)
    labels = preference_labels(rewards)
    assert labels.tolist() == [1.0, -1.0, -1.0, 1.0, 0.0, 0.0]  # the third pair ties: dropped
    chosen, rejected = pair_indices(labels)
    assert chosen.tolist() == [0, 3] and rejected.tolist() == [1, 2]
    with pytest.raises(ValueError, match="two completions per prompt"):
        preference_labels(torch.zeros(3))


def test_xpo_losses_by_hand():
    dpo = torch.tensor([0.7, 0.2], dtype=torch.float64)
    logps = torch.tensor([-12.0, -3.5], dtype=torch.float64)
    torch.testing.assert_close(xpo_losses(dpo, logps, 0.1), torch.tensor([0.7 - 1.2, 0.2 - 0.35], dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha"):
        xpo_losses(dpo, logps, -1.0)


def _trl_online_dpo(rewards, logps, ref_logps, beta, loss_type):
    """TRL OnlineDPOTrainer.training_step's loss: completions [first half | second half], summed log-probs [2B]."""
    batch = rewards.numel() // 2
    first, second = rewards.split(batch)
    mask = first >= second
    rng = torch.arange(batch)
    chosen_indices = rng + (~mask * batch)
    rejected_indices = rng + (mask * batch)
    pi = logps[chosen_indices] - logps[rejected_indices]
    ref = ref_logps[chosen_indices] - ref_logps[rejected_indices]
    logits = pi - ref
    losses = -F.logsigmoid(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
    return losses.mean()


def _trl_xpo(model_on_model, model_on_ref, ref_on_ref, ref_on_model, chosen_mask, beta, alpha):
    """TRL XPOTrainer._compute_losses (sigmoid): [B] summed log-probs of the policy's and the reference's completions."""
    chosen_model = torch.where(chosen_mask, model_on_model, model_on_ref)
    chosen_ref = torch.where(chosen_mask, ref_on_model, ref_on_ref)
    rejected_model = torch.where(~chosen_mask, model_on_model, model_on_ref)
    rejected_ref = torch.where(~chosen_mask, ref_on_model, ref_on_ref)
    logits = (chosen_model - chosen_ref) - (rejected_model - rejected_ref)
    return (-F.logsigmoid(beta * logits) + alpha * model_on_ref).mean()


def _interleave(first, second):  # pmetal's layout: the two completions of prompt p at rows 2p, 2p + 1
    return torch.stack([first, second], dim=1).flatten()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_online_dpo_matches_trl_on_random_float64(loss_type):
    g = torch.Generator().manual_seed(0)
    batch, beta = 16, 0.3
    rewards, logps, ref = (torch.randn(2 * batch, generator=g, dtype=torch.float64) for _ in range(3))
    logps, ref = logps * 20 - 40, ref * 20 - 40
    expected = _trl_online_dpo(rewards, logps, ref, beta, loss_type)
    # pmetal's layout pairs row p of TRL's first half with row p of its second half
    ours = [_interleave(x[:batch], x[batch:]) for x in (rewards, logps, ref)]
    chosen, rejected = pair_indices(preference_labels(ours[0]))
    assert len(chosen) == batch  # random rewards never tie
    losses, _, _ = dpo_loss(ours[1][chosen], ours[1][rejected], ours[2][chosen], ours[2][rejected], beta=beta,
                            loss_type=loss_type)
    torch.testing.assert_close(losses.mean(), expected)


def test_xpo_matches_trl_on_random_float64():
    g = torch.Generator().manual_seed(1)
    batch, beta, alpha = 12, 0.1, 0.05
    model_on_model, model_on_ref, ref_on_ref, ref_on_model = (
        torch.randn(batch, generator=g, dtype=torch.float64) * 15 - 30 for _ in range(4))
    model_scores, ref_scores = torch.randn(batch, generator=g, dtype=torch.float64), torch.randn(
        batch, generator=g, dtype=torch.float64)
    expected = _trl_xpo(model_on_model, model_on_ref, ref_on_ref, ref_on_model, model_scores >= ref_scores, beta, alpha)

    # pmetal: rows (policy's completion, reference's completion) per prompt, ranked by their rewards
    policy = _interleave(model_on_model, model_on_ref)
    reference = _interleave(ref_on_model, ref_on_ref)
    chosen, rejected = pair_indices(preference_labels(_interleave(model_scores, ref_scores)))
    dpo, _, _ = dpo_loss(policy[chosen], policy[rejected], reference[chosen], reference[rejected], beta=beta)
    torch.testing.assert_close(xpo_losses(dpo, policy[1::2], alpha).mean(), expected)
