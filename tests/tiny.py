"""Tiny random models built in place, for unit tests that need no tokenizer."""

import torch


def tiny_llama(vocab_size: int = 97, seed: int = 0, **overrides):
    """A 2-layer, hidden-32 LlamaForCausalLM in eval mode; `overrides` go into its LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()
