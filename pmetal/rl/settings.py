"""What a rollout is made of: the settings every online method hands to the sampler.

They live in the core so the module (which supplies them, ``rollout_settings()``) and the callback
(which runs :class:`pmetal.rl.sampler.RolloutSampler` with them) both import them from below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pmetal.generation.sampling import SamplingConfig


@dataclass
class RolloutSettings:
    sampling: SamplingConfig
    num_generations: int
    scale_rewards: str = "group"
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    speculative: bool = False
    draft: Any = None  # the draft model (None: prompt lookup under speculative)
    num_draft_tokens: int = 4
    compile_decode: bool | None = None  # the engine's torch.compile of its round (None: where graphs are captured)
    cuda_graphs: bool | None = None  # the engine's CUDA graphs (None: on CUDA); False for a model whose forward switches modes
    async_rewards: bool = False
    chunks: int = 1
    advantage_estimator: str = "grpo"  # pmetal.losses.policy.estimate_advantages
    episodes: Any = None  # tool episodes (pmetal.tools.agent.AgentRollout): multi-turn rows instead of one call
