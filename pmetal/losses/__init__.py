"""Loss functions: small pure functions on tensors (no model, no Lightning).

    from pmetal.losses import dpo_loss, grpo_loss

Each loss says which paper and equation it implements in its docstring, with tensor shapes in
comments, and is tested against hand-computed values and an independent reference. Names resolve
to their submodule on first use, so importing this package stays cheap:

- `pmetal.losses.lm`: chunked linear cross-entropy / token log-probs without full-vocabulary logits
  (`chunked_linear_logps`, `chunked_linear_cross_entropy`).
- `pmetal.losses.preference`: DPO, SimPO, ORPO, KTO.
- `pmetal.losses.policy`: group advantages, GRPO / DAPO.
- `pmetal.losses.online_preference`: Online DPO's pairs from rewards, XPO's exploration term.
- `pmetal.losses.reward`: the Bradley–Terry loss of a pairwise reward model.
- `pmetal.losses.distill`: generalized JSD for on-policy distillation.
- `pmetal.losses.embedding`: InfoNCE (MultipleNegativesRanking), triplet, CoSENT.
"""

from __future__ import annotations

from pmetal.lazy import lazy_exports

_EXPORTS = {
    "chunked_linear_logps": "pmetal.losses.lm",
    "chunked_linear_cross_entropy": "pmetal.losses.lm",
    "dpo_loss": "pmetal.losses.preference",
    "simpo_loss": "pmetal.losses.preference",
    "orpo_loss": "pmetal.losses.preference",
    "kto_loss": "pmetal.losses.preference",
    "preference_labels": "pmetal.losses.online_preference",
    "pair_indices": "pmetal.losses.online_preference",
    "xpo_losses": "pmetal.losses.online_preference",
    "group_advantages": "pmetal.losses.policy",
    "zero_spread_groups": "pmetal.losses.policy",
    "grpo_loss": "pmetal.losses.policy",
    "jsd_loss": "pmetal.losses.distill",
    "bradley_terry_loss": "pmetal.losses.reward",
    "info_nce_loss": "pmetal.losses.embedding",
    "triplet_loss": "pmetal.losses.embedding",
    "cosent_loss": "pmetal.losses.embedding",
    "duplicate_text_mask": "pmetal.losses.embedding",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
