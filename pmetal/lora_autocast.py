"""LoRA layers that leave their input alone under autocast.

PEFT's `lora.Linear.forward` casts the layer input to the adapter's dtype before `lora_A` (fp32:
the adapters are kept in full precision, as QLoRA prescribes). Under autocast (Lightning's
`bf16-mixed` / `16-mixed`) `lora_A` then casts that fp32 copy straight back to bf16, so

- two elementwise kernels per adapted layer and step are wasted (and their mirror in backward), and
- the bf16 tensor autocast hands to `lora_A` is a *new* tensor, which autograd saves for lora_A's
  weight gradient beside the input the base layer already saved: a second copy of the input of
  every adapted layer. Without gradient checkpointing that is a large share of activation memory
  (measured in benchmarks/RESULTS.md, "LoRA inputs under autocast").

PEFT's own bitsandbytes LoRA layers skip the cast when autocast is on, for the same reason; this
does the same for PEFT's plain `lora.Linear` and pmetal's `QuantLoraLinear`. A cast is skipped only
when autocast is enabled on the input's device, where every linear layer of the adapter casts its
operands to the autocast dtype anyway, and bf16 -> fp32 -> bf16 is exact: values and gradients are
unchanged (tests/unit/test_lora_autocast.py). Without autocast PEFT's cast is kept (it is needed
when base weights and adapters differ in dtype), and so it is for DoRA, whose weight norm is
computed in the dtype of the input (fp32 with the cast, bf16 without).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class AutocastInputMixin:
    """Override of PEFT's `LoraLayer._cast_input_dtype`: a no-op while autocast is on for the input."""

    def _cast_input_dtype(self, x, dtype: torch.dtype):
        # DoRA (a "variant") computes its weight norm in the input's dtype: keep its fp32 input.
        if x is not None and not self.lora_variant and torch.is_autocast_enabled(x.device.type):
            return x
        return super()._cast_input_dtype(x, dtype)


class AutocastLoraLinear(AutocastInputMixin, LoraLinear):
    """PEFT's `lora.Linear` with the autocast-aware input cast."""


def keep_input_dtype_under_autocast(model: torch.nn.Module) -> int:
    """Give PEFT's plain LoRA linear layers of `model` the autocast-aware input cast, in place.

    Only layers whose type is exactly PEFT's `lora.Linear` change class (to a subclass, so PEFT's
    isinstance checks, saving and merging work as before); layers of other back-ends (bitsandbytes,
    pmetal's QuantLoraLinear, which has the mixin already) are left as they are. Returns how many
    layers changed.
    """
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = AutocastLoraLinear
            count += 1
    return count
