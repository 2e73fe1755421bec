"""What a rollout is made of: the settings shared by the GRPO-family modules and RolloutCallback.

They live in the core so the module (which supplies them) and the callback (which uses them) both
import them from below, not from each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmetal.generation.sampling import SamplingConfig


@dataclass
class RolloutSettings:
    sampling: SamplingConfig
    num_generations: int
    scale_rewards: str = "group"
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
