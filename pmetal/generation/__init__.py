"""Generation for rollouts: the rollout engine (static cache, CUDA graphs, speculation), its sampler, and the
decode session (continuous batching on the engine's slot cache)."""

from pmetal.generation.engine import RolloutEngine, generate
from pmetal.generation.session import DecodeSession, RowEvent, SessionFull
from pmetal.generation.sampling import (
    Generation,
    SamplingConfig,
    generate_reference,
    process_logits,
    stop_token_ids,
)

__all__ = ["DecodeSession", "Generation", "RolloutEngine", "RowEvent", "SamplingConfig", "SessionFull", "generate",
           "generate_reference", "process_logits", "stop_token_ids"]
