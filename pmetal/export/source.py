"""What an export starts from: a plain full-precision model, whatever the user named.

`load_fused(name)` takes a model (HF directory, hub id, .gguf file, "default", a `*-bnb-4bit`
checkpoint), a PEFT adapter directory (LoRA/DoRA, fused into its base), or a pmetal run directory
(its `final/`). A QLoRA base (pmetal NF4/FP4/INT8 or bitsandbytes 4-bit) is dequantized first, so
the adapter is fused into the weights it was trained against; `FusedModel.notes` says what was done.
A sentence-transformers directory (from `pmetal embed-train`) is an embedding model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmetal.errors import PmetalError


@dataclass
class FusedModel:
    model: Any  # a plain transformers model, eval mode, no adapter, no quantized layers
    tokenizer: Any
    source: str
    notes: list[str] = field(default_factory=list)
    embedding: dict | None = None  # {"pooling": ..., "normalize": ...} for a sentence-embedding model


def resolve_source(name: str | Path) -> Path | str:
    """A run directory becomes its `final/` export; anything else is returned as it is."""
    path = Path(str(name)).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        if (path / "final").is_dir():
            return path / "final"
        if not (path / "modules.json").is_file():
            raise PmetalError(f"{path}: neither a model (config.json), an adapter (adapter_config.json), a "
                              "sentence-transformers directory (modules.json) nor a pmetal run (final/)")
    return path if path.exists() else str(name)


def is_bnb_checkpoint(base: str | Path) -> bool:
    """True for a directory saved quantized by transformers + bitsandbytes."""
    from pmetal.quant.bnb_compat import bitsandbytes_bits

    from pmetal.models import read_model_config

    config = Path(str(base)) / "config.json"
    # 8-bit too: pmetal's loader then says it reads bitsandbytes 4-bit only
    return config.is_file() and bitsandbytes_bits(read_model_config(config.parent)) is not None


def adapter_settings(adapter: Path) -> dict:
    """The adapter's training settings (pmetal_config.json), or {} for a foreign adapter."""
    settings_file = adapter / "pmetal_config.json"
    return json.loads(settings_file.read_text()) if settings_file.is_file() else {}


def load_base_for_adapter(adapter: str | Path, *, base: str | None = None, quantization: str | None = None,
                          quant_block_size: int = 64, double_quant: bool = True, trust_remote_code: bool = False):
    """(peft_model, tokenizer, base, quantization): the adapter on its dequantized fp32 base, unmerged.

    The base is `base`, else the model pmetal trained on (pmetal_config.json), else PEFT's
    `base_model_name_or_path`. With a quantization (read from the settings when not given) the
    base is quantized exactly as in training and dequantized, so nothing is requantized.
    """
    from pmetal.models import load_model_and_tokenizer, load_tokenizer
    from pmetal.quant import dequantize_model, load_adapter, load_quantized_model, quantize_model

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise PmetalError(f"{adapter}: no adapter_config.json; expected a PEFT adapter directory (e.g. runs/x/final)")
    settings = adapter_settings(adapter)
    base = base or settings.get("model") or json.loads(config_file.read_text()).get("base_model_name_or_path") or "default"
    if quantization is None:
        quantization = settings.get("quantization")
        quant_block_size = settings.get("quant_block_size", quant_block_size)
        double_quant = settings.get("double_quant", double_quant)
    if is_bnb_checkpoint(base):
        model = load_quantized_model(base, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
        quantization = quantization or model.pmetal_quantization["quant_type"]
    else:
        model, tokenizer = load_model_and_tokenizer(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
        if quantization:
            quantize_model(model, quantization, block_size=quant_block_size, double_quant=double_quant)
    dequantize_model(model, torch.float32)  # no-op without quantization
    if (adapter / "tokenizer_config.json").is_file():  # the tokenizer it was trained with (pad token, template)
        from transformers import AutoTokenizer

        from pmetal.models import ensure_pad_token

        tokenizer = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=trust_remote_code)
        ensure_pad_token(tokenizer)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    peft_model = load_adapter(model, adapter)
    return peft_model.eval(), tokenizer, str(base), quantization


def load_embedding_model(path: Path, *, trust_remote_code: bool = False) -> FusedModel:
    """A sentence-transformers directory: its transformer, pooling mode and normalization."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu", trust_remote_code=trust_remote_code)
    transformer, pooling = st[0], st[1]
    mode = getattr(pooling, "pooling_mode", None) or "mean"
    if mode not in ("cls", "mean", "lasttoken"):
        raise PmetalError(f"{path}: pooling {mode!r} cannot be exported; supported: cls, mean, lasttoken")
    normalize = any(type(m).__name__ == "Normalize" for m in st)
    model = transformer.auto_model.float().eval()
    return FusedModel(model, transformer.tokenizer, str(path), embedding={"pooling": mode, "normalize": normalize})


def load_fused(name: str | Path = "default", *, base: str | None = None, trust_remote_code: bool = False) -> FusedModel:
    """The plain fp32 model an export writes, with its tokenizer; see the module docstring."""
    from pmetal.models import load_model_and_tokenizer, load_tokenizer

    source = resolve_source(name)
    path = Path(str(source))
    notes: list[str] = []
    if path.is_dir() and (path / "modules.json").is_file():
        fused = load_embedding_model(path, trust_remote_code=trust_remote_code)
        fused.notes.append(f"sentence-embedding model: {fused.embedding['pooling']} pooling"
                           + (", L2-normalized" if fused.embedding["normalize"] else ""))  # fmt: skip
        return fused
    if path.is_dir() and (path / "adapter_config.json").is_file():
        peft_model, tokenizer, base_name, quantization = load_base_for_adapter(
            path, base=base, trust_remote_code=trust_remote_code)
        if quantization:
            notes.append(f"the {quantization} base was dequantized to float32 before fusing (QLoRA)")
        notes.append(f"adapter {path} fused into {base_name}")
        model = peft_model.merge_and_unload()
    elif is_bnb_checkpoint(path):
        from pmetal.quant import dequantize_model, load_quantized_model

        model = load_quantized_model(path, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        notes.append(f"{path} is a bitsandbytes {model.pmetal_quantization['quant_type']} checkpoint: "
                     "dequantized to float32")  # fmt: skip
        dequantize_model(model, torch.float32)
    else:
        model, tokenizer = load_model_and_tokenizer(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return FusedModel(plain_model(model).eval(), tokenizer, str(source), notes)


def plain_model(model):
    """The model without its quantization record: a model loaded from GGUF (already dequantized)
    or a dequantized QLoRA base still carries it, and transformers then refuses to cast or save."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False):
        return model.float()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()):
        raise PmetalError(f"could not rebuild a plain {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain
