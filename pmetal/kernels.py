"""Fused Triton kernels for a causal LM's RMSNorm, rotary embedding and SwiGLU MLP on CUDA, from
Liger Kernel (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training").

Applied at the functional level, never by swapping classes: the forward of each RMSNorm and MLP
class becomes a dispatcher that, for the module instances fused here, feeds the module's own weight
and submodules through Liger's kernel, and runs the class's own forward for every other instance.
An adapter inside an MLP (LoRA, DoRA, a QLoRA base under its gate/up/down projections) keeps
running as PEFT built it; only the element-wise work between the projections is fused. The rotary
embedding is a function of each modeling module; it is replaced by one that sends CUDA tensors to
Liger's kernel and every other tensor to the original, so a CPU model in the same process is
untouched. Every replaced forward falls back to the original where the kernel would not give the
same result: tensors off CUDA, mixed dtypes (an fp32 norm weight on a bf16 row keeps HF's fp32
output), and inside a `torch.compile` region, where the compiler fuses the same element-wise work
itself and a hand-written kernel would only break the graph.

Departures from Liger's own `apply_liger_kernel_to_*`: fused per instance (other models of the same
class keep HF's path; the rotary function is per modeling module, routed by device), and no Liger
cross-entropy: pmetal's chunked linear cross-entropy
(`pmetal.losses.lm`) stays the loss. Supported model families: `KERNEL_FAMILIES` (Llama-style
RMSNorm `weight * x.to(dtype)`, `down(silu(gate(x)) * up(x))` MLPs, HF's `apply_rotary_pos_emb`).
"""

from __future__ import annotations

import functools
import importlib
import logging
import weakref

import torch
from torch import nn

from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")

#: transformers model families whose RMSNorm, MLP and rotary embedding have Liger's semantics.
KERNEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def liger_available() -> bool:
    """Whether `liger-kernel` (and Triton) can be imported."""
    try:
        import liger_kernel.ops  # noqa: F401
    except Exception:
        return False
    return True


def resolve_kernels(setting: str, device_type: str, available: bool | None = None) -> tuple[bool, str]:
    """Whether a run with `kernels=setting` on `device_type` uses Liger's kernels, and why (for the log).

    "auto": on CUDA when liger-kernel is installed; off on CPU and MPS. "liger": required (a
    PmetalError where it cannot run). "off": never.
    """
    if setting not in ("auto", "liger", "off"):
        raise PmetalError(f"kernels {setting!r} not understood; expected auto, liger or off")
    if setting == "off":
        return False, "off (--kernels off)"
    available = liger_available() if available is None else available
    if device_type != "cuda":
        if setting == "liger":
            raise PmetalError(f"--kernels liger needs a CUDA device (Triton); this run is on {device_type}")
        return False, f"automatic only on CUDA, this run is on {device_type}"
    if not available:
        if setting == "liger":
            raise PmetalError("--kernels liger needs the liger-kernel package: pip install liger-kernel")
        return False, "liger-kernel is not installed (pip install liger-kernel)"
    return True, "Liger's RMSNorm, RoPE and SwiGLU on CUDA (--kernels off turns them off)"


def _family(module: nn.Module) -> str | None:
    """The transformers model family of a module's class: "qwen3" for `...qwen3.modeling_qwen3`."""
    last = type(module).__module__.rsplit(".", 1)[-1]
    return last[len("modeling_"):] if last.startswith("modeling_") else None


def _on_kernel_device(tensor: torch.Tensor) -> bool:
    """Where Liger's kernels run: CUDA (tests widen it to the CPU)."""
    return tensor.is_cuda


def _fusable(*tensors: torch.Tensor) -> bool:
    """The fused path gives HF's result: tensors of one dtype on the kernels' device, outside a
    torch.compile region (where the compiler fuses the same work)."""
    if torch.compiler.is_compiling():
        return False
    first = tensors[0]
    return _on_kernel_device(first) and all(t.dtype == first.dtype for t in tensors)


def _liger_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from liger_kernel.ops import LigerRMSNormFunction

    # "llama" casting: the variance in fp32, the normalized row cast back before the weight, as HF does
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def _liger_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up, 1.0, 1.0)


def _liger_rope(q, k, cos, sin):
    from liger_kernel.ops import LigerRopeFunction

    return LigerRopeFunction.apply(q, k, cos, sin)


def _fused_rms_norm(module, hidden_states):
    if not _fusable(hidden_states, module.weight):
        return None
    return _liger_rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _fused_swiglu_mlp(module, x):
    gate, up = module.gate_proj(x), module.up_proj(x)
    if not _fusable(gate, up):
        return module.down_proj(module.act_fn(gate) * up)
    return module.down_proj(_liger_silu_mul(gate, up))


def _is_llama_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(weight, torch.Tensor) and weight.dim() == 1)


def _is_swiglu_mlp(module: nn.Module, config) -> bool:
    act = getattr(config, "hidden_act", None)
    return (type(module).__name__.endswith("MLP") and act in ("silu", "swish")
            and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")))


#: the module instances whose class forward takes the fused path (others of the class keep HF's)
_FUSED_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
#: each patched class's own forward, by class
_CLASS_FORWARDS: dict[type, object] = {}


def _dispatching_forward(original, fused):
    """A class forward: the fused one for the instances in `_FUSED_MODULES`, outside torch.compile.

    One function per class, not a forward per instance: compiled decoder layers share one graph only
    if their submodules' forwards are the same object (an instance attribute would be guarded by
    identity and recompile every layer)."""

    @functools.wraps(original)
    def forward(self, x, *args, **kwargs):
        if not args and not kwargs and not torch.compiler.is_compiling() and self in _FUSED_MODULES:
            out = fused(self, x)
            if out is not None:
                return out
        return original(self, x, *args, **kwargs)

    return forward


def _fuse(module: nn.Module, fused) -> None:
    cls = type(module)
    if cls not in _CLASS_FORWARDS:
        _CLASS_FORWARDS[cls] = cls.forward
        cls.forward = _dispatching_forward(cls.forward, fused)
    _FUSED_MODULES.add(module)


class _RopeDispatcher:
    """A modeling module's `apply_rotary_pos_emb`: Liger's kernel where it applies, else HF's."""

    def __init__(self, original) -> None:
        self.original = original

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if args or kwargs or not _fusable(q, k, cos, sin):  # position_ids / unsqueeze_dim variants: HF's
            return self.original(q, k, cos, sin, *args, **kwargs)
        return _liger_rope(q, k, cos, sin)


def _patch_rope(family: str) -> bool:
    """Route the family's `apply_rotary_pos_emb` through Liger for CUDA tensors (once per process)."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if not isinstance(current, _RopeDispatcher):
        modeling.apply_rotary_pos_emb = _RopeDispatcher(current)
    return True


def apply_liger_kernels(model: nn.Module) -> dict[str, int]:
    """Fuse the RMSNorms, SwiGLU MLPs and rotary embedding of `model` (PEFT-wrapped or not) in place.

    Returns how many of each were fused ({"rms_norm": N, "swiglu": N, "rope": 0/1}); a model of a
    family outside `KERNEL_FAMILIES` is left as is (all zeros). Idempotent.
    """
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    families = set()
    for module in model.modules():
        family = _family(module)
        if family not in KERNEL_FAMILIES:
            continue
        families.add(family)
        if _is_llama_rms_norm(module):
            _fuse(module, _fused_rms_norm)
            counts["rms_norm"] += 1
        elif _is_swiglu_mlp(module, getattr(module, "config", None) or _config_of(model)):
            _fuse(module, _fused_swiglu_mlp)
            counts["swiglu"] += 1
    counts["rope"] = int(bool(families) and all(_patch_rope(f) for f in families))
    return counts


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "text_config", None) or config


def apply_kernels(model: nn.Module, setting: str, device_type: str) -> dict[str, int]:
    """Resolve `setting` for `device_type`, fuse `model` when on, and log the decision."""
    on, why = resolve_kernels(setting, device_type)
    if not on:
        log.info("fused kernels off: %s", why)
        return {}
    counts = apply_liger_kernels(model)
    if not any(counts.values()):
        log.info("fused kernels off: no Liger kernels for %s (families %s)", type(model).__name__,
                 ", ".join(KERNEL_FAMILIES))
    else:
        log.info("fused kernels on: %s; %d RMSNorm, %d SwiGLU MLP, rotary embedding %s", why, counts["rms_norm"],
                 counts["swiglu"], "fused" if counts["rope"] else "as is")
    return counts
