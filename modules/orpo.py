"""ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee & Thorne 2024, arXiv:2403.07691).

Loss (Eq. 6): the negative log-likelihood of the chosen completion plus beta (the paper's lambda)
times the odds-ratio term of `pmetal.losses.preference.orpo_loss` (Eq. 7), whose odds use the
length-normalized likelihood (Eq. 3-4). No reference model: one concatenated forward per step.

Departures from the paper: the NLL is the mean over all chosen completion tokens of the batch, not
a mean of per-example means. Its scope is a setting: ``nll_scope="completion"`` (the default) is the
paper's SFT term on the chosen response; ``nll_scope="full"`` scores the prompt tokens too, as
TRL's ORPOTrainer does (over prompt + completion of the chosen rows), for runs that must match TRL.
The odds ratio always compares the completions only. Logged rewards are beta times the average
log-probs, as in TRL.

Metrics (TRL's names with TRL's meanings; docs/metrics.md): ``logps/*`` are the average log-probs
of the completions; ``log_odds_chosen`` the mean log-odds ratio of chosen over rejected;
``log_odds_ratio`` the mean log-sigmoid of it; ``nll_loss`` the NLL term of ``nll_scope``.
"""

from __future__ import annotations

from typing import Literal

import torch

from pmetal.losses.preference import orpo_loss
from pmetal.modules.preference import PairPreferenceModule, completion_sides


class OrpoModule(PairPreferenceModule):
    """ORPO on preference pairs (see PmetalModule for the model/adapter/optimizer arguments).

    Args:
        beta: weight lambda of the odds-ratio term against the NLL of the chosen completion (paper: 0.1).
        nll_scope: the tokens of the chosen rows the NLL term covers: "completion" (the paper's SFT
            term) or "full" (prompt and completion, as TRL's ORPOTrainer).
        **kwargs: the arguments of PairPreferenceModule (shared_prompt) and PmetalModule (model, adapter, ...).
    """

    needs_reference = False

    def __init__(self, beta: float = 0.1, nll_scope: Literal["completion", "full"] = "completion", **kwargs) -> None:
        if nll_scope not in ("completion", "full"):
            raise ValueError(f"nll_scope must be 'completion' or 'full', got {nll_scope!r}")
        super().__init__(**kwargs)

    def compute_loss(self, batch):
        beta = self.hparams.beta
        full = self.hparams.nll_scope == "full"
        out, labels = self.pair_forward(batch, score_chosen_prompt=full)
        chosen, rejected = completion_sides(out, labels)
        if full:
            half = chosen.sum.shape[0]
            nll_tokens = out.num_tokens[:half].sum()
            nll = -out.sum[:half].sum() / nll_tokens.clamp_min(1)
        else:
            nll_tokens = chosen.num_tokens.sum()
            nll = -chosen.sum.sum() / nll_tokens.clamp_min(1)
        or_losses, log_odds = orpo_loss(chosen.mean, rejected.mean, beta=beta)
        metrics = self.preference_metrics(beta * chosen.mean, beta * rejected.mean, chosen.mean, rejected.mean,
                                          chosen, rejected)
        metrics.update({
            "nll_loss": nll.detach(),
            "log_odds_chosen": log_odds.detach().mean(),
            "log_odds_ratio": torch.nn.functional.logsigmoid(log_odds.detach()).mean(),
        })
        from pmetal.modules.distributed import distributed_mean

        return distributed_mean(self, nll, nll_tokens) + self.batch_mean(or_losses), metrics
