"""The engine's prompt side: which models it serves, and the prompt forward its decode rounds start from.

Each of the ``P`` distinct prompts is prefilled once (:func:`pmetal.generation.sampling.prompt_forward`,
the reference loop's own prompt path, images and multimodal positions included); the engine then
copies each prompt's per-layer KV into its ``G`` decode rows.
"""

from __future__ import annotations

import torch

from pmetal.generation.sampling import prompt_forward


def prompt_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``(keys, values)`` per layer of a prefilled ``DynamicCache`` (None: not a plain per-layer cache)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        return None
    if not pairs or any(not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) for k, v in pairs):
        return None
    return pairs


def engine_supports(model) -> bool:
    """Full attention through SDPA or eager attention (the 4-D slot mask); no sliding window, no hybrid cache."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    return impl in ("sdpa", "eager") and not has_sliding_window(model)


def has_sliding_window(model) -> bool:
    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None) or []
    text = getattr(config, "text_config", None)
    types = list(types) + list(getattr(text, "layer_types", None) or [])
    return any("sliding" in str(t) or "linear" in str(t) for t in types) or bool(getattr(config, "use_sliding_window", False))


def prefill(model, prompts, pad_token_id: int, group: int, prefill_inputs, device) -> dict | None:
    """The prompts' forward (images included) and what decoding starts from; None: not a plain cache.

    Decoding continues at each prompt's largest position + 1: the rounds' 1-D positions, which
    Qwen-VL repeats on every M-RoPE axis, as its update forward places text after an image. The
    per-row tensors are repeated ``group`` times (prompt-major); the per-layer KV stays once per
    prompt until it is copied into the decode rows.
    """
    ids, mask, last, out, cache = prompt_forward(model, prompts, pad_token_id, device, prefill_inputs)
    width = ids.shape[1]
    layers = prompt_layers(getattr(out, "past_key_values", None) or cache)
    if layers is None or any(k.shape[2] != width for k, _ in layers):
        return None
    rep = lambda t: t.repeat_interleave(group, dim=0)  # noqa: E731
    return {"ids": rep(ids), "mask": rep(mask), "start": rep(last + 1), "logits": rep(out.logits[:, -1, :].float()),
            "layers": layers, "width": width, "group": group}
