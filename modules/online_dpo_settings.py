"""The GrpoModule settings Online DPO and XPO refuse, with why: read by the module (a clear error) and
by `pmetal online-dpo` (no flag). Kept free of heavy imports, so the command's --help stays fast."""

GRPO_ONLY: dict[str, str] = {
    "num_generations": "online DPO samples exactly two completions per prompt",
    "num_iterations": "each rollout makes one optimizer step",
    "epsilon": "there is no clipped ratio in the DPO loss",
    "epsilon_high": "there is no clipped ratio in the DPO loss",
    "scale_rewards": "rewards only rank the two completions",
    "advantage_estimator": "rewards only rank the two completions",
    "tis_cap": "the DPO loss has no importance ratio",
    "top_entropy_quantile": "the DPO loss scores whole completions",
    "importance_sampling_level": "the DPO loss has no importance ratio",
}
