"""The engine's prompt side: which models it serves, and the prompt forward its decode rounds start from.

Each of the ``P`` distinct prompts is prefilled once (:func:`pmetal.generation.sampling.prompt_forward`,
the reference loop's own prompt path, images and multimodal positions included); the engine then
copies each prompt's per-layer KV into its ``G`` decode rows.
"""

from __future__ import annotations

from pmetal.generation.hf_internals import attn_implementation, cache_layers, output_cache
from pmetal.generation.sampling import prompt_forward


def engine_supports(model) -> bool:
    """Full attention through SDPA or eager attention (the 4-D slot mask); no sliding window, no hybrid cache."""
    return attn_implementation(model) in ("sdpa", "eager") and not has_sliding_window(model)


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
    layers = cache_layers(output_cache(out, cache))
    if layers is None or any(k.shape[2] != width for k, _ in layers):
        return None
    rep = lambda t: t.repeat_interleave(group, dim=0)  # noqa: E731
    return {"ids": rep(ids), "mask": rep(mask), "start": rep(last + 1), "logits": rep(out.logits[:, -1, :].float()),
            "layers": layers, "width": width, "group": group}
