"""Loss functions: small pure functions on tensors (no model, no Lightning).

Each loss says which paper and equation it implements in its docstring, with tensor shapes in
comments, and is tested against hand-computed values and an independent reference.

This package imports nothing on purpose (importing it must stay cheap); import from the submodule:

- `pmetal.losses.lm`: chunked linear cross-entropy / token log-probs without full-vocabulary logits
  (`chunked_linear_logps`, `chunked_linear_cross_entropy`).
- `pmetal.losses.preference`: DPO, SimPO, ORPO, KTO.
- `pmetal.losses.policy`: group advantages, GRPO / DAPO.
- `pmetal.losses.distill`: generalized JSD for on-policy distillation.
- `pmetal.losses.embedding`: InfoNCE (MultipleNegativesRanking), triplet, CoSENT.
"""
