"""Interchange with bitsandbytes: its kernels as an optional backend, its 4-bit checkpoints as input.

A transformers + bitsandbytes 4-bit checkpoint (`*-bnb-4bit` on the hub) stores, per quantized
linear `<prefix>`:

- `<prefix>.weight`: packed uint8 [(numel + 1) // 2, 1] (same bytes as pmetal's `qweight`);
- `<prefix>.weight.absmax`: fp32 [nblocks], or uint8 [nblocks] with double quantization;
- `<prefix>.weight.quant_map`: the 16 code values;
- with double quantization `<prefix>.weight.nested_absmax` fp32, `<prefix>.weight.nested_quant_map`
  (the 256-entry dynamic map);
- `<prefix>.weight.quant_state.bitsandbytes__nf4|fp4`: uint8 bytes of a JSON dict with quant_type,
  blocksize, dtype, shape and, when nested, nested_blocksize, nested_dtype, nested_offset.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import torch

from pmetal.errors import PmetalError
from pmetal.quant import functional as QF

STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@lru_cache(maxsize=1)
def bitsandbytes_available() -> bool:
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional  # noqa: F401
    except Exception:
        return False
    return True


def to_bnb_state(state: QF.QuantState, dtype: torch.dtype):
    """pmetal QuantState -> bitsandbytes.functional.QuantState (sharing the tensors)."""
    import bitsandbytes.functional as bnbf

    device = state.absmax.device
    code = QF.code_4bit(state.quant_type, device)
    nested = None
    if state.double_quant:
        nested = bnbf.QuantState(absmax=state.nested_absmax, code=QF.dynamic_map(device),
                                 blocksize=QF.NESTED_BLOCK_SIZE, dtype=torch.float32)  # fmt: skip
    return bnbf.QuantState(absmax=state.absmax, shape=torch.Size(state.shape), code=code,
                           blocksize=state.block_size, quant_type=state.quant_type, dtype=dtype,
                           offset=state.nested_offset, state2=nested)  # fmt: skip


def bnb_dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a QuantLinear with bitsandbytes' kernel (the same values as pmetal's)."""
    import bitsandbytes.functional as bnbf

    cached = layer._bnb_state
    if cached is None or cached.dtype != dtype:
        cached = layer._bnb_state = to_bnb_state(layer.quant_state, dtype)
    return bnbf.dequantize_4bit(layer.qweight.view(-1, 1), cached)


# ---------------------------------------------------------------------------------------------
# reading bitsandbytes checkpoints


def bnb_weight_prefixes(keys) -> list[str]:
    """Module prefixes whose weight is stored 4-bit by bitsandbytes, from state-dict keys."""
    marker = ".weight.quant_state.bitsandbytes__"
    return sorted(k.split(marker)[0] for k in keys if marker in k)


def parse_bnb_state(prefix: str, tensors: dict[str, torch.Tensor], source: str = "") -> tuple[torch.Tensor, QF.QuantState]:
    """Read one bitsandbytes-quantized weight from `tensors` (keys `<prefix>.weight...`).

    Returns (packed codes [(numel + 1) // 2] uint8, QuantState) ready for `QuantLinear.load_quantized`.
    """
    base = f"{prefix}.weight"
    json_keys = [k for k in tensors if k.startswith(base + ".quant_state.bitsandbytes__")]
    if len(json_keys) != 1 or base not in tensors or f"{base}.absmax" not in tensors:
        raise PmetalError(f"{source}: '{prefix}' is not a complete bitsandbytes 4-bit weight "
                          f"(expected {base}, {base}.absmax and one {base}.quant_state.bitsandbytes__*)")  # fmt: skip
    meta = json.loads(bytes(tensors[json_keys[0]].cpu().numpy()).decode("utf-8"))
    quant_type = meta["quant_type"]
    if quant_type not in ("nf4", "fp4"):
        raise PmetalError(f"{source}: '{prefix}' uses bitsandbytes type {quant_type!r}; expected nf4 or fp4")
    quant_map = tensors.get(f"{base}.quant_map")
    if quant_map is not None and not torch.equal(quant_map.float().cpu(), QF.code_4bit(quant_type)):
        raise PmetalError(f"{source}: '{prefix}' has a non-standard {quant_type} code table")
    state = QF.QuantState(quant_type, int(meta["blocksize"]), tuple(meta["shape"]), tensors[f"{base}.absmax"])
    if "nested_absmax" in meta or f"{base}.nested_absmax" in tensors:
        if int(meta.get("nested_blocksize", QF.NESTED_BLOCK_SIZE)) != QF.NESTED_BLOCK_SIZE:
            raise PmetalError(f"{source}: '{prefix}' has nested block size {meta['nested_blocksize']}; expected 256")
        nested_map = tensors.get(f"{base}.nested_quant_map")
        if nested_map is not None and not torch.equal(nested_map.float().cpu(), QF.dynamic_map()):
            raise PmetalError(f"{source}: '{prefix}' has a non-standard nested code table")
        state.absmax = state.absmax.to(torch.uint8)
        state.nested_absmax = tensors[f"{base}.nested_absmax"].float()
        state.nested_offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
    else:
        state.absmax = state.absmax.float()
    packed = tensors[base]
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8
        packed = packed.contiguous().view(torch.uint8)
    return packed.reshape(-1), state


def bitsandbytes_bits(config: dict) -> int | None:
    """4 or 8 when a Hugging Face `config.json` (as a dict) says bitsandbytes saved the weights, else None."""
    settings = config.get("quantization_config") or {}
    if settings.get("quant_method") != "bitsandbytes":
        return None
    return 4 if settings.get("load_in_4bit") else 8


def bnb_config_settings(config) -> dict | None:
    """The 4-bit settings from a HF config's `quantization_config`, or None if it is not bnb 4-bit."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise PmetalError(f"checkpoint is quantized with {qc.get('quant_method')!r}; pmetal reads bitsandbytes 4-bit only")
    if not qc.get("load_in_4bit"):
        raise PmetalError("checkpoint is bitsandbytes 8-bit (LLM.int8); pmetal reads bitsandbytes 4-bit only")
    return qc
