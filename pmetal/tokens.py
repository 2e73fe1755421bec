"""Token-level constants shared by the data, loss, log-prob and generation code (one place each).

- `IGNORE_INDEX`: the label of a position that gets no loss (PyTorch's cross-entropy default, and
  what Hugging Face collators and TRL use).
- `END_OF_TURN_TOKENS`: the tokens that close an assistant turn in common chat templates. The data
  side trains an assistant turn up to and including the first of them that its template uses
  (`pmetal.data.render.end_of_turn_markers`); generation stops at any of them that is in the
  vocabulary (`pmetal.generation.sampling.stop_token_ids`). Only real turn or sequence ends belong
  here: a token that closes some other block (Mistral's `[/TOOL_RESULTS]` closes a tool result, and
  the assistant speaks after it) would end rollouts early and cut training targets short.
"""

from __future__ import annotations

IGNORE_INDEX = -100

END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: Qwen, SmolLM, Phi-4
    "<|eot_id|>",  # Llama 3
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
    "<|endoftext|>",  # GPT-2 style EOS (Qwen base, Phi)
    "<|end_of_text|>",  # Llama 3 base EOS (in Llama 3 Instruct's generation_config)
    "</s>",  # Llama 2, Mistral
    "<｜end▁of▁sentence｜>",  # DeepSeek
    "<end_of_utterance>",  # Idefics3 / SmolVLM
)
