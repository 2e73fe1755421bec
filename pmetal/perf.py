"""Speed and memory switches for training: selective gradient checkpointing and regional
`torch.compile`.

pmetal's chunked linear cross-entropy (`pmetal.losses.lm`) is Liger's fused-linear-cross-entropy
trick in plain PyTorch; regional `torch.compile` fuses the RMSNorm/SwiGLU/RoPE element-wise work,
and in layers left eager on CUDA Liger's own kernels do (`pmetal.kernels`). Activation offload and
the chunked MLP for long rows live in `pmetal.activations`.

Gradient checkpointing is non-reentrant (`torch.utils.checkpoint(use_reentrant=False)`): it needs no
`enable_input_require_grads` hack for frozen embeddings under LoRA and composes with `torch.compile`.
It is set per decoder layer, on the `GradientCheckpointingLayer`s transformers 5 builds its decoders
from, so any subset of layers can be checkpointed (fewer layers: faster, more memory).
"""

from __future__ import annotations

import functools
import logging
import re

import torch
from torch import nn

from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")


def decoder_layers(model) -> list[nn.Module]:
    """The repeated decoder blocks of a (PEFT-wrapped) causal LM, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def parse_layer_selection(layers: str | list[int] | None, num_layers: int) -> list[int]:
    """Layer indices from a selection: None/"all", "none", "every:N", "0-11,20,-1" or a list of ints.

    Negative indices count from the end. Raises PmetalError on anything else.
    """
    if layers is None or layers == "all" or layers is True:
        return list(range(num_layers))
    if layers in ("none", "", False):
        return []
    if isinstance(layers, str):
        every = re.fullmatch(r"every[:-](\d+)", layers.strip())
        if every:
            step = int(every.group(1))
            if step < 1:
                raise PmetalError(f"gradient checkpointing layers '{layers}': N in every:N must be >= 1")
            return list(range(0, num_layers, step))
        indices: list[int] = []
        for part in layers.split(","):
            match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
            if not match:
                raise PmetalError(
                    f"gradient checkpointing layers '{layers}' not understood; "
                    "expected all, none, every:N, or indices and ranges like 0-11,20,-1"
                )
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            indices.extend(range(first, last + 1))
        layers = indices
    selected = sorted({i + num_layers if i < 0 else i for i in layers})
    bad = [i for i in selected if not 0 <= i < num_layers]
    if bad:
        raise PmetalError(f"gradient checkpointing layer(s) {bad} out of range: the model has {num_layers} layers")
    return selected


def enable_gradient_checkpointing(model, layers: str | list[int] | None = None) -> list[int]:
    """Checkpoint the selected decoder layers (non-reentrant); the others keep their activations.

    Args:
        model: a Hugging Face causal LM, PEFT-wrapped or not.
        layers: which layers, see `parse_layer_selection`; None = all, "none" = turn it off.

    Returns:
        The indices of the checkpointed layers.
    """
    blocks = decoder_layers(model)
    if not blocks:
        raise PmetalError(f"{type(model).__name__} has no decoder layers that support gradient checkpointing")
    selected = set(parse_layer_selection(layers, len(blocks)))
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for index, block in enumerate(blocks):
        block._gradient_checkpointing_func = checkpoint
        block.gradient_checkpointing = index in selected
    return sorted(selected)


#: optimizer steps a run needs before `compile=None` compiles on CUDA: the regional compile of a
#: 0.6B-parameter decoder costs tens of seconds, repaid at about half a second a step (RESULTS.md).
AUTO_COMPILE_MIN_STEPS = 100


def auto_compile_decision(*, eligible: bool, device_type: str, steps: float, eager: str = "") -> tuple[bool, str]:
    """Whether a run left at `compile=None` compiles, and why (for the log line); `eager` names the
    settings that keep the layers eager, if any."""
    if eager:
        return False, f"{eager} run eager"
    if not eligible:
        return False, "not chosen automatically for this method or model (pass --compile to force it)"
    if device_type != "cuda":
        return False, f"automatic only on CUDA, this run is on {device_type} (pass --compile to force it)"
    if steps < AUTO_COMPILE_MIN_STEPS:
        return False, f"{steps} optimizer steps are fewer than the {AUTO_COMPILE_MIN_STEPS} that repay the compile"
    return True, f"CUDA and {steps} optimizer steps (automatic; --no-compile turns it off)"


def maybe_compile(model, enabled: bool = True, scope: str = "layers", **compile_kwargs) -> bool:
    """Compile the model in place with `torch.compile`.

    scope "layers" compiles each decoder layer (regional compilation): identical layers share one
    compiled graph (PyTorch inlines nn.Module parameters as inputs), so compile time does not grow
    with depth. scope "model" compiles the whole decoder stack (embedding, every layer with its
    checkpointing, final norm) as one graph: longer to compile, fewer Python calls per step. The LM
    head and chunked loss stay eager either way. Returns whether compilation was turned on; off when
    disabled or when dynamo is unavailable.
    """
    if not enabled:
        return False
    try:
        import torch._dynamo  # noqa: F401
    except Exception as error:  # pragma: no cover - platforms without dynamo
        log.warning("torch.compile unavailable (%s); running eager", error)
        return False
    if scope not in ("layers", "model"):
        raise PmetalError(f"compile scope {scope!r} not understood; expected 'layers' or 'model'")
    if scope == "model":
        from pmetal.logps import backbone_and_head

        backbone_and_head(model)[0].compile(**compile_kwargs)
        return True
    blocks = decoder_layers(model)
    if not blocks:
        log.warning("no decoder layers to compile in %s; running eager", type(model).__name__)
        return False
    for block in blocks:
        block.compile(**compile_kwargs)
    return True
