"""A rollout's reward and completion statistics, under TRL's GRPOTrainer names (docs/metrics.md)."""

from __future__ import annotations

import logging
import math

import torch

from pmetal.losses.policy import zero_spread_groups
from pmetal.rl.rollout import RolloutRow

log = logging.getLogger("pmetal")


def rollout_metrics(rows: list[RolloutRow], per_function: dict[str, list[float]], group: int,
                    seconds: float) -> dict[str, float]:
    """Reward and completion statistics over every completion sampled this step."""
    rewards = torch.tensor([r.reward for r in rows], dtype=torch.float32)
    lengths = torch.tensor([len(r.completion_ids) for r in rows], dtype=torch.float32)
    terminated = torch.tensor([len(r.completion_ids) for r in rows if not r.truncated], dtype=torch.float32)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rows) > 1 else 0.0,
        "frac_reward_zero_std": float(zero_spread_groups(rewards, group).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": sum(r.truncated for r in rows) / len(rows),
        "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0,
        "completions/min_terminated_length": float(terminated.min()) if len(terminated) else 0.0,
        "completions/max_terminated_length": float(terminated.max()) if len(terminated) else 0.0,
        "rollout/tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9),
        "rollout/seconds": seconds,
    }
    metrics.update(per_function_metrics(per_function))
    metrics.update(nan_reward_metrics(per_function, len(rows)))
    return metrics


def per_function_metrics(per_function: dict[str, list[float]]) -> dict[str, float]:
    """`rewards/<name>/mean` and `/std` over the scores each function gave (NaN = does not apply)."""
    metrics = {}
    for name, scores in per_function.items():
        finite = torch.tensor([s for s in scores if not math.isnan(s)], dtype=torch.float32)
        metrics[f"rewards/{name}/mean"] = float(finite.mean()) if len(finite) else float("nan")
        metrics[f"rewards/{name}/std"] = float(finite.std()) if len(finite) > 1 else 0.0
    return metrics


def nan_reward_metrics(per_function: dict[str, list[float]], completions: int) -> dict[str, float]:
    """`rewards/<name>/nan_fraction` per function and `rewards/nan_fraction` (completions no function
    scored), with one warning a step naming the functions that returned NaN/None.

    A NaN score means "does not apply" (TRL's convention, summed as nansum); a completion that no
    function scores gets reward 0, so a function that fails on everything trains on nothing.
    """
    metrics, silent = {}, []
    unscored = [True] * completions
    for name, scores in per_function.items():
        missing = [math.isnan(s) for s in scores]
        unscored = [u and m for u, m in zip(unscored, missing)]
        metrics[f"rewards/{name}/nan_fraction"] = sum(missing) / max(len(scores), 1)
        if any(missing):
            silent.append(f"{name} ({sum(missing)} of {len(scores)})")
    metrics["rewards/nan_fraction"] = sum(unscored) / max(completions, 1) if per_function else 0.0
    if silent:
        log.warning("rewards: NaN/None scores this step from %s; %d of %d completions have no reward at all "
                    "(they get 0 and teach nothing); a NaN means the function does not apply",
                    ", ".join(silent), sum(unscored), completions)
    return metrics
