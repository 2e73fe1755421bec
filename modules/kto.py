"""KTO: Model Alignment as Prospect Theoretic Optimization (Ethayarajh et al. 2024, arXiv:2402.01306).

Unpaired data: each row is one completion labelled desirable or undesirable. The loss
(`pmetal.losses.preference.kto_loss`, Eq. 7-8) scores each completion's log-ratio against the
reference point z0 = KL(pi_theta || pi_ref), estimated each step as the mean log-ratio of
mismatched prompt/completion pairs, clamped at 0 and detached (paper §4.2, TRL).

Departures from the paper: the mismatched pairs are fixed per example by the DataModule (row i's
prompt with another row's completion, chosen by a seeded permutation) instead of rebuilt inside
each microbatch, so their reference log-probs can be precomputed; the estimate has the same
expectation. The reference is the base model with the adapter off (a frozen copy under full
fine-tuning). The policy's KL sequences run without gradient, as in TRL.
"""

from __future__ import annotations

import torch

from pmetal.losses.preference import kto_loss
from pmetal.modules.distributed import global_sum, world_size
from pmetal.modules.preference import PreferenceModule, concat_sides, log, mean_logit, split_sides


class KtoModule(PreferenceModule):
    """KTO on labelled completions (see PmetalModule for the model/adapter/optimizer arguments).

    Args:
        beta: beta of the value function; higher keeps the policy closer to the reference.
        desirable_weight: lambda_D, the weight of desirable rows' losses.
        undesirable_weight: lambda_U, the weight of undesirable rows' losses. The paper advises
            desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3].
        precompute_ref_logps: compute the reference log-probs of every example (and its KL pair)
            once before training and reuse them.
        **kwargs: the arguments of PmetalModule (model, adapter, lora_r, learning_rate, ...).
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 precompute_ref_logps: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)

    def on_fit_start(self) -> None:
        from pmetal.data.kto import kto_balance_warning

        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "num_desirable"):
            warning = kto_balance_warning(datamodule.num_desirable, datamodule.num_undesirable,
                                          self.hparams.desirable_weight, self.hparams.undesirable_weight)
            if warning:
                log.warning(warning)
        super().on_fit_start()

    def _compute_reference(self, batch):
        input_ids, attention_mask, labels = concat_sides(batch, "", "kl_")
        ref = self.reference_logps(input_ids, attention_mask, labels)
        completion, mismatched = split_sides(ref.sum, ref.mean, ref.num_tokens)
        return torch.stack([completion.sum, mismatched.sum], dim=1)  # [B, 2]

    def compute_loss(self, batch):
        hp = self.hparams
        policy = self.completion_logps(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       return_mean_logits=True)
        with torch.no_grad():
            policy_kl = self.completion_logps(batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        ref = self.reference_values(batch)  # [B, 2]: completion, mismatched completion
        # z0 over the global batch: every rank's mismatched pairs (summed by the strategy's all-reduce)
        kl_terms = policy_kl.sum - ref[:, 1]
        if world_size(self) > 1:
            kl_terms = global_sum(self, kl_terms.sum()) / global_sum(self, kl_terms.numel()).clamp_min(1)
        kl = kl_terms.mean().clamp(min=0)
        desirable = batch["desirable"].bool()
        losses, rewards = kto_loss(policy.sum, ref[:, 0], desirable, kl, beta=hp.beta,
                                   desirable_weight=hp.desirable_weight, undesirable_weight=hp.undesirable_weight)
        metrics = {"kl": kl}
        logits_sum = policy.token_mean_logits.sum(-1)  # [B]
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if rows.any():
                metrics[f"rewards/{name}"] = rewards[rows].mean()
                metrics[f"logps/{name}"] = policy.sum.detach()[rows].mean()
                metrics[f"logits/{name}"] = mean_logit(logits_sum[rows], policy.num_tokens[rows])
        if desirable.any() and (~desirable).any():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return self.batch_mean(losses), metrics
