"""Quantized base weights for QLoRA on every device: NF4 / FP4 / INT8, bitsandbytes-compatible.

- `functional`: block-wise quantize/dequantize (pure PyTorch, bit-exact with bitsandbytes on CPU).
- `QuantLinear`: frozen quantized linear layer (codes and scales as buffers).
- `quantize_model(model, quant_type, block_size, double_quant, compute_dtype, skip_modules)` and
  `load_quantized_model(path, ...)`: quantize in place, or while reading safetensors shards (also
  reads transformers + bitsandbytes 4-bit checkpoints); `dequantize_model` undoes it.
- `prepare_peft` / `register_quant_lora` / `load_adapter`: PEFT LoRA and DoRA on quantized layers.

Names resolve lazily so that `import pmetal.quant` stays cheap (PEFT imports take seconds).
"""

from __future__ import annotations

from pmetal.lazy import lazy_exports

_EXPORTS = {
    "QuantLinear": "pmetal.quant.linear",
    "compile_dequantize": "pmetal.quant.linear",
    "QuantState": "pmetal.quant.functional",
    "quantize": "pmetal.quant.functional",
    "dequantize": "pmetal.quant.functional",
    "quantize_nf4": "pmetal.quant.functional",
    "dequantize_nf4": "pmetal.quant.functional",
    "quantize_fp4": "pmetal.quant.functional",
    "dequantize_fp4": "pmetal.quant.functional",
    "quantize_int8": "pmetal.quant.functional",
    "dequantize_int8": "pmetal.quant.functional",
    "QUANT_TYPES": "pmetal.quant.functional",
    "quantize_model": "pmetal.quant.model",
    "dequantize_model": "pmetal.quant.model",
    "load_quantized_model": "pmetal.quant.model",
    "quantized_memory": "pmetal.quant.model",
    "prepare_peft": "pmetal.quant.peft",
    "register_quant_lora": "pmetal.quant.peft",
    "register_peft": "pmetal.quant.peft",
    "load_adapter": "pmetal.quant.peft",
    "QuantLoraLinear": "pmetal.quant.peft",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
