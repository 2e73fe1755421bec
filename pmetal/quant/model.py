"""Whole-model quantization: replace nn.Linear layers by QuantLinear, in place or while loading.

`quantize_model` converts a model already in memory, one layer at a time (each full-precision
weight is freed as soon as its layer is quantized). `load_quantized_model` builds the model on the
meta device and fills it from the safetensors shards, quantizing each linear weight as it is read,
so peak memory is the quantized model plus one full-precision tensor. It also reads checkpoints
that transformers + bitsandbytes saved in 4 bits, taking their packed bytes as they are.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from pmetal.errors import PmetalError
from pmetal.quant import functional as QF
from pmetal.quant.bnb_compat import bnb_config_settings, bnb_weight_prefixes, parse_bnb_state
from pmetal.quant.linear import QuantLinear

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_skipped(name: str, skip_modules) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip_modules or ())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _tied_to_input_embeddings(model: nn.Module, linear: nn.Linear) -> bool:
    get_input = getattr(model, "get_input_embeddings", None)
    emb = get_input() if callable(get_input) else None
    return emb is not None and getattr(emb, "weight", None) is linear.weight


def quantizable_linear_names(model: nn.Module, skip_modules=("lm_head",)) -> list[str]:
    """Names of the nn.Linear layers `quantize_model` would replace."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _is_skipped(name, skip_modules) and not _tied_to_input_embeddings(model, module)
    ]


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules=("lm_head",),
    backend: str = "auto",
) -> nn.Module:
    """Replace every nn.Linear of `model` (except `skip_modules`) by a QuantLinear, in place.

    Args:
        model: the model; each layer is quantized on the device it is on.
        quant_type: "nf4", "fp4" or "int8".
        block_size: values per absmax block.
        double_quant: quantize the absmax constants too (~0.37 fewer bits per parameter for 4-bit, block 64).
        compute_dtype: dtype of the dequantized weights in the matmul; None follows the input.
        skip_modules: module names (full or last component) kept in full precision.
        backend: "auto", "pmetal" or "bitsandbytes" (see QuantLinear).

    Returns:
        The same model object.
    """
    if quant_type not in QF.QUANT_TYPES:
        raise PmetalError(f"unknown quantization {quant_type!r}; expected one of {QF.QUANT_TYPES}")
    QF.check_block_size(block_size)
    for name in quantizable_linear_names(model, skip_modules):
        linear = model.get_submodule(name)
        quantized = QuantLinear.from_linear(linear, quant_type=quant_type, block_size=block_size,
                                            double_quant=double_quant, compute_dtype=compute_dtype, backend=backend)  # fmt: skip
        _set_submodule(model, name, quantized)
        del linear  # the full-precision weight goes with the last reference
    _record_quantization(model, quant_type, block_size, double_quant)
    return model


def _record_quantization(model: nn.Module, quant_type: str, block_size: int, double_quant: bool) -> None:
    model.pmetal_quantization = {"quant_type": quant_type, "block_size": block_size, "double_quant": double_quant}


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight, in place."""
    names = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    for name in names:
        quantized = model.get_submodule(name)
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                           device="meta")  # fmt: skip
        linear.weight = nn.Parameter(quantized.dequantize(dtype), requires_grad=False)
        if quantized.bias is not None:
            linear.bias = nn.Parameter(quantized.bias.detach().to(dtype), requires_grad=False)
        _set_submodule(model, name, linear)
    if hasattr(model, "pmetal_quantization"):
        del model.pmetal_quantization
    return model


def quantized_memory(model: nn.Module) -> dict[str, float]:
    """Bytes of the quantized weights, their parameter count and bytes per parameter."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    nbytes = sum(m.quantized_nbytes() for m in layers)
    params = sum(m.in_features * m.out_features for m in layers)
    return {"quantized_bytes": nbytes, "quantized_params": params, "bytes_per_param": nbytes / max(params, 1)}


# ---------------------------------------------------------------------------------------------
# loading from a Hugging Face directory


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in dict.fromkeys(weight_map.values())]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise PmetalError(f"{path}: no model.safetensors or model.safetensors.index.json; expected safetensors weights")


def move_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Move the buffers that have data to `device`, in place, leaving parameters and dtypes alone.

    Buffers computed at construction (the rotary `inv_freq` ...) are built on the CPU, outside
    `init_empty_weights`' reach, and are not in the checkpoint; left there, every forward copies
    them to the device (a host-device synchronization on CUDA).
    """
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[key] = buffer.to(device)


_TRIM_EVERY_BYTES = 64 * 2**20


def release_freed_host_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc's `malloc_trim`); False where unavailable.

    Quantizing on the CPU frees a full-precision weight per layer; glibc keeps such blocks in its
    heap (after the first large free it serves same-sized requests from the heap, not mmap), and
    the packed weights allocated in between pin it. Trimming every `_TRIM_EVERY_BYTES` of freed
    weights keeps the loader's peak near the loaded model's size (benchmarks/RESULTS.md, "`--quantization`
    now loads layer by layer").
    """
    if sys.platform != "linux":
        return False
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc (musl ...)
        return False


def load_quantized_model(
    path: str | Path,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules=("lm_head",),
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Build a causal LM from a Hugging Face directory, quantizing linear weights as they are read.

    A checkpoint saved by transformers + bitsandbytes in 4 bits is read as it is (its quant type,
    block size and double quantization win over the arguments; nothing is requantized).

    Args:
        path: directory with config.json and safetensors shard(s).
        quant_type, block_size, double_quant, compute_dtype, skip_modules, backend: as in
            `quantize_model`.
        dtype: dtype of the weights kept in full precision (embeddings, norms, lm_head); default
            the checkpoint's dtype.
        device: where the model is built and quantized.
        trust_remote_code: passed to transformers.
        attn_implementation: "sdpa", "eager", ...; None: transformers' default.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise PmetalError(f"{path}: no config.json; expected a Hugging Face model directory")
    files = _shard_files(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    bnb_settings = bnb_config_settings(config)
    if bnb_settings is not None:
        config.quantization_config = None
        del config.quantization_config
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if (path / "generation_config.json").exists():  # from_config leaves the generation defaults
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)

    key_files: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            key_files.update({k: file for k in f.keys()})
    expected = set(model.state_dict().keys())

    bnb_prefixes = bnb_weight_prefixes(key_files) if bnb_settings is not None else []
    if bnb_settings is not None:
        quant_type = bnb_settings.get("bnb_4bit_quant_type", "fp4")
        double_quant = bool(bnb_settings.get("bnb_4bit_use_double_quant", False))
        targets = bnb_prefixes
    else:
        targets = quantizable_linear_names(model, skip_modules)
    bnb_keys = {k for p in bnb_prefixes for k in key_files if k == f"{p}.weight" or k.startswith(f"{p}.weight.")}
    plain_keys = [k for k in key_files if k not in bnb_keys]
    unexpected = [k for k in plain_keys if k not in expected and not k.endswith(".weight_format")]
    if unexpected:
        log.warning("%s: ignoring %d checkpoint tensors the model does not have, e.g. %s", path, len(unexpected), unexpected[:3])

    handles = {file: safe_open(file, framework="pt", device=str(device)) for file in files}
    loaded: set[str] = set()
    freed_host_bytes = 0
    try:
        for name in targets:
            linear = model.get_submodule(name)
            bias_key = f"{name}.bias"
            bias = handles[key_files[bias_key]].get_tensor(bias_key).to(dtype) if bias_key in key_files else None
            if bnb_settings is not None:
                tensors = {k: handles[key_files[k]].get_tensor(k) for k in key_files if k == f"{name}.weight" or k.startswith(f"{name}.weight.")}
                codes, state = parse_bnb_state(name, tensors, source=str(path))
                layer = QuantLinear(linear.in_features, linear.out_features, bias is not None, quant_type=state.quant_type,
                                    block_size=state.block_size, double_quant=state.double_quant,
                                    compute_dtype=compute_dtype, backend=backend, device="meta")  # fmt: skip
                layer.load_quantized(codes.to(device), state.to(device), bias)
                block_size = state.block_size
            else:
                weight_key = f"{name}.weight"
                if weight_key not in key_files:
                    raise PmetalError(f"{path}: checkpoint has no tensor '{weight_key}'")
                weight = handles[key_files[weight_key]].get_tensor(weight_key)
                layer = QuantLinear.from_weight(weight, bias, quant_type=quant_type, block_size=block_size,
                                                double_quant=double_quant, compute_dtype=compute_dtype, backend=backend)  # fmt: skip
                if weight.device.type == "cpu":
                    freed_host_bytes += weight.numel() * 4  # its fp32 working copies, freed with it
                del weight
                if freed_host_bytes >= _TRIM_EVERY_BYTES:
                    release_freed_host_memory()
                    freed_host_bytes = 0
            _set_submodule(model, name, layer)
            loaded.update({f"{name}.weight", bias_key})
        for key in plain_keys:
            if key in loaded or key not in expected:
                continue
            tensor = handles[key_files[key]].get_tensor(key)
            set_module_tensor_to_device(model, key, device, value=tensor, dtype=dtype if tensor.is_floating_point() else None)
            loaded.add(key)
    finally:
        handles.clear()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    move_buffers(model, device)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if still_meta:
        raise PmetalError(f"{path}: checkpoint is missing {len(still_meta)} tensors the model needs, e.g. {still_meta[:3]}")
    _record_quantization(model, quant_type, block_size, double_quant)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # give back the segments only the full-precision transients used
    return model.eval()
