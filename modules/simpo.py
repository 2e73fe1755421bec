"""SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng, Xia & Chen 2024, arXiv:2405.14734).

The loss (`pmetal.losses.preference.simpo_loss`, Eq. 6) compares the length-normalized log-probs
of the chosen and rejected completions, scaled by beta, against a target margin gamma; there is no
reference model, so each step is one forward (chosen and rejected concatenated) and one backward.

Departures from the paper: none in the loss; `label_smoothing` (0 by default) adds the cDPO-style
smoothing TRL's CPO trainer offers. Logged rewards are beta times the average log-probs and `logps/*`
the average log-probs, as in TRL.
"""

from __future__ import annotations

from pmetal.losses.preference import simpo_loss
from pmetal.modules.preference import PairPreferenceModule


class SimpoModule(PairPreferenceModule):
    """SimPO on preference pairs (see PmetalModule for the model/adapter/optimizer arguments).

    Args:
        beta: reward scale beta (the paper uses 2.0-2.5 for instruction-tuned models).
        gamma_beta_ratio: the target reward margin gamma as a fraction of beta (the paper's 0.5).
        label_smoothing: assumed fraction of flipped preference labels, in [0, 0.5).
        **kwargs: the arguments of PairPreferenceModule (shared_prompt) and PmetalModule (model, adapter, ...).
    """

    needs_reference = False

    def __init__(self, beta: float = 2.5, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0,
                 **kwargs) -> None:
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        super().__init__(**kwargs)

    def compute_loss(self, batch):
        hp = self.hparams
        chosen, rejected = self.pair_logps(batch)
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen.mean, rejected.mean, beta=hp.beta, gamma_beta_ratio=hp.gamma_beta_ratio,
            label_smoothing=hp.label_smoothing,
        )
        # logps/* are the average log-probs SimPO scores, as TRL's CPOTrainer (loss_type simpo) logs them
        return self.batch_mean(losses), self.preference_metrics(chosen_rewards, rejected_rewards, chosen.mean,
                                                               rejected.mean, chosen, rejected)
