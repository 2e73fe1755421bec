"""The one place generation touches transformers internals (tests/unit/test_layers.py keeps it so).

The rollout engine needs a few things transformers has no public API for: which attention a model
dispatches to (``config._attn_implementation``) and switching it to the slot attention for a
round; swapping a layer's projection modules in place (``_modules``) for the fused decode copy;
the cache keyword of a model's ``forward`` (``cache`` in transformers >= 5.2x, ``past_key_values``
before); and the per-layer tensors of a prefilled ``DynamicCache`` (``cache.layers`` in
transformers 5, ``key_cache``/``value_cache`` before). When transformers changes one of them,
this file is the only one to change.
"""

from __future__ import annotations

import inspect

import torch


# ------------------------------------------------------------------ attention dispatch
def attn_implementation(model, default: str | None = "sdpa") -> str | None:
    """The attention implementation `model`'s layers dispatch to ("sdpa", "eager", ...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", default) or default


def register_attention(name: str, function) -> bool:
    """Register `function` as attention implementation `name`; False where transformers has no registry."""
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(name, function)
        return True
    except Exception:  # noqa: BLE001 - an older transformers: the model's own attention is used
        return False


class dispatch_attention:
    """Within the block, `model`'s SDPA attention layers dispatch to the registered `name` (a model on
    another implementation, or a transformers without the registry, keeps its own attention)."""

    def __init__(self, model, name: str, register) -> None:
        self.config = getattr(model, "config", None)
        self.name, self.register = name, register
        self.previous = None

    def __enter__(self):
        impl = getattr(self.config, "_attn_implementation", None)
        if impl == "sdpa" and self.register():
            self.previous = impl
            self.config._attn_implementation = self.name
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            self.config._attn_implementation = self.previous


# ------------------------------------------------------------------ modules
def swap_submodule(parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put `module` in `parent`'s child slot `name` as it is (no re-registration checks: a stand-in
    that shares the original's parameters must not be registered as their second owner)."""
    parent._modules[name] = module


# ------------------------------------------------------------------ the cache
def forward_kwargs(model) -> tuple[str, bool]:
    """The cache keyword of the underlying HF model's ``forward`` and whether it takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def new_prompt_cache():
    """A fresh ``DynamicCache`` for a prompt forward."""
    from transformers import DynamicCache

    return DynamicCache()


def output_cache(output, fallback):
    """The cache a forward returned (``output.past_key_values``), else the one it was given."""
    return getattr(output, "past_key_values", None) or fallback


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
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
