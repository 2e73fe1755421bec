"""Generation for rollouts: the rollout engine (static cache, CUDA graphs, speculation) and its sampler."""

from pmetal.generation.engine import RolloutEngine, generate
from pmetal.generation.sampling import (
    Generation,
    SamplingConfig,
    generate_reference,
    process_logits,
    stop_token_ids,
)

__all__ = ["Generation", "RolloutEngine", "SamplingConfig", "generate", "generate_reference", "process_logits",
           "stop_token_ids"]
