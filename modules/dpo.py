"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) and its variants.

The loss (`pmetal.losses.preference.dpo_loss`) is a setting, `loss_type`: "sigmoid" (DPO, Eq. 7;
with `label_smoothing` it is conservative DPO), "hinge" (SLiC-HF), "ipo" (Azar et al. 2023, on
per-token average log-probs as TRL and the IPO authors do) and "robust" (rDPO, Chowdhury et al. 2024).

Departures from the paper: the reference policy is the base model with the adapter switched off
(no second model in memory under LoRA/DoRA; a frozen copy only under full fine-tuning), as in TRL;
chosen and rejected completions go through the policy in one forward, by default as one row per
pair holding the prompt once (`pmetal.shared_prompt`); reference log-probs are computed once per
example and reused in later epochs (`reuse_ref_logps`). Logged rewards
are beta times the *summed* log-ratios for every loss type (for IPO too, so they compare across
runs), the loss itself is the batch mean.
"""

from __future__ import annotations

from typing import Literal

import torch

from pmetal.losses.preference import dpo_loss
from pmetal.modules.preference import PairPreferenceModule, split_sides


class DpoModule(PairPreferenceModule):
    """DPO and its variants on preference pairs (see PmetalModule for the model/adapter/optimizer arguments).

    Args:
        beta: the KL-penalty strength beta (IPO's tau); higher keeps the policy closer to the reference.
        loss_type: "sigmoid" (DPO), "hinge" (SLiC-HF), "ipo" (IPO), or "robust" (rDPO).
        label_smoothing: assumed fraction of flipped preference labels, in [0, 0.5): conservative DPO
            for "sigmoid", the noise rate of "robust"; must be 0 for "hinge" and "ipo".
        precompute_ref_logps: compute the reference log-probs of every example once before training
            and reuse them (under full fine-tuning this frees the frozen reference copy).
        reuse_ref_logps: keep each example's reference log-probs from its first visit and reuse them
            in later epochs instead of running the reference again (saved in checkpoints; skipped
            when the reference forward has active dropout, where a recomputation would differ).
        **kwargs: the arguments of PairPreferenceModule (shared_prompt) and PmetalModule (model, adapter, ...).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_ref_logps: bool = False,
        reuse_ref_logps: bool = True,
        **kwargs,
    ) -> None:
        # Check the settings before the (slow) model load.
        z = torch.zeros(1)
        dpo_loss(z, z, z, z, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        super().__init__(**kwargs)

    def _compute_reference(self, batch):
        ref = self.pair_reference_logps(batch)
        chosen, rejected = split_sides(ref.sum, ref.mean, ref.num_tokens)
        return torch.stack([chosen.sum, rejected.sum, chosen.mean, rejected.mean], dim=1)  # [B, 4]

    def compute_loss(self, batch):
        hp = self.hparams
        # the reference first: its cache lookup reads the batch's indices on the host, which waits for
        # the device, and at the start of the step the device has almost nothing queued
        ref = self.reference_values(batch)  # [B, 4]: sums then means
        chosen, rejected = self.pair_logps(batch)
        if hp.loss_type == "ipo":
            policy_c, policy_r, ref_c, ref_r = chosen.mean, rejected.mean, ref[:, 2], ref[:, 3]
        else:
            policy_c, policy_r, ref_c, ref_r = chosen.sum, rejected.sum, ref[:, 0], ref[:, 1]
        losses, _, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=hp.beta, loss_type=hp.loss_type,
                                label_smoothing=hp.label_smoothing)
        chosen_rewards = hp.beta * (chosen.sum - ref[:, 0]).detach()
        rejected_rewards = hp.beta * (rejected.sum - ref[:, 1]).detach()
        return self.batch_mean(losses), self.preference_metrics(chosen_rewards, rejected_rewards, chosen.sum,
                                                               rejected.sum, chosen, rejected)
