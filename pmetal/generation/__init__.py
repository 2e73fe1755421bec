"""Generation for rollouts: batched, KV-cached sampling that records sampling-time log-probs."""

from pmetal.generation.sampling import Generation, SamplingConfig, generate, process_logits, stop_token_ids

__all__ = ["Generation", "SamplingConfig", "generate", "process_logits", "stop_token_ids"]
