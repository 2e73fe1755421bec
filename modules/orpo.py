"""ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee & Thorne 2024, arXiv:2403.07691).

Loss (Eq. 6): the negative log-likelihood of the chosen completion plus beta (the paper's lambda)
times the odds-ratio term of `pmetal.losses.preference.orpo_loss` (Eq. 7), whose odds use the
length-normalized likelihood (Eq. 3-4). No reference model: one concatenated forward per step.

Departures from the paper: the NLL is the mean over all chosen completion tokens of the batch (as in
TRL's ORPOTrainer), not a mean of per-example means. Logged rewards are beta times the average
log-probs, as in TRL.
"""

from __future__ import annotations

from pmetal.losses.preference import orpo_loss
from pmetal.modules.preference import PreferenceModule


class OrpoModule(PreferenceModule):
    """ORPO on preference pairs (see PmetalModule for the model/adapter/optimizer arguments).

    Args:
        beta: weight lambda of the odds-ratio term against the NLL of the chosen completion (paper: 0.1).
        **kwargs: the arguments of PmetalModule (model, adapter, lora_r, learning_rate, ...).
    """

    needs_reference = False

    def __init__(self, beta: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)

    def compute_loss(self, batch):
        beta = self.hparams.beta
        chosen, rejected = self.pair_logps(batch)
        nll = -chosen.sum.sum() / chosen.num_tokens.sum().clamp_min(1)
        or_losses, log_odds = orpo_loss(chosen.mean, rejected.mean, beta=beta)
        metrics = self.preference_metrics(beta * chosen.mean, beta * rejected.mean, chosen.sum, rejected.sum)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": log_odds.mean()})
        from pmetal.modules.distributed import distributed_mean

        return distributed_mean(self, nll, chosen.num_tokens.sum()) + self.batch_mean(or_losses), metrics
