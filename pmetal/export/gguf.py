"""GGUF for llama.cpp, Ollama and LM Studio, written with the `gguf` package's writer.

Architectures: the llama-family decoders transformers' own GGUF reader knows: Llama (SmolLM
included), Qwen2 and Qwen3. Weights in f32, f16, bf16 or a block type (q8_0, q5_1, q4_1, q4_0; 2-D weights whose rows are
a whole number of 32-value blocks; norms and any other tensor stay f32, as llama.cpp's converter
keeps them). The token embedding (and a tied output) is stored at the file's type too, as that
converter stores it: keeping it f32 was measured not to close the gap to fp32
(benchmarks/bench_gguf_precision.py, RESULTS.md). The byte-level BPE tokenizer, its special tokens and the chat template go into the
metadata, so the file is self-contained.

The pre-tokenizer name llama.cpp needs comes from `pmetal.export.pretokenizer` (llama.cpp's probe
hash, checked against the tokenizer's split rule). Departures from llama.cpp's `convert_hf_to_gguf.py`:
sentencepiece vocabularies and RoPE scaling (Llama 3.1's `rope_freqs`) are refused with a clear
error rather than written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from pmetal.export.common import ExportError

# transformers class -> llama.cpp architecture name
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}  # fmt: skip
QUANT_BLOCK = 32


def architecture_of(model) -> str:
    names = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    for name in names + [type(model).__name__]:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ExportError(f"GGUF export does not know the architecture {names[0]!r}; supported: "
                      f"{', '.join(ARCHITECTURES)}")  # fmt: skip


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"blk.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
    raise ExportError(f"GGUF export has no llama.cpp name for the tensor {hf_name!r}")


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's Llama rotates the two halves of each head; llama.cpp's Llama rotates adjacent pairs.
    Reorder each head's output rows from (half, index) to (index, half); transformers' GGUF reader
    undoes exactly this for `llama` files."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def check_config(config, arch: str) -> None:
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in ("default", None):
        raise ExportError(f"GGUF export does not write RoPE scaling {kind!r} (rope_scaling in config.json)")
    if getattr(config, "attention_bias", False) and arch == "llama" or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export of Llama with attention or MLP biases is not supported")


def tensor_bytes(name: str, array: np.ndarray, file_type: str):
    """(data, raw_dtype or None) for one tensor in the file's type."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if array.ndim < 2 or file_type == "f32":
        return array.astype(np.float32), None
    if file_type == "f16":
        return array.astype(np.float16), None
    if file_type == "bf16":
        return quants.quantize(array.astype(np.float32), Q.BF16), Q.BF16
    qtype = getattr(Q, file_type.upper())
    if array.shape[-1] % QUANT_BLOCK:
        return array.astype(np.float16), None  # rows that are not whole blocks: llama.cpp's fallback too
    return quants.quantize(array.astype(np.float32), qtype), qtype


# --dtype / --quantize value -> gguf.LlamaFileType member (the quantized ones: blockwise types the
# gguf package can quantize and llama.cpp reads; which are offered is QUANTIZATIONS["gguf"])
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}


def add_tokenizer(writer, tokenizer, vocab_size: int, pre_tokenizer: str | None = None) -> None:
    """Tokens, token types, merges, special ids and chat template as GGUF metadata."""
    from gguf import TokenType

    from pmetal.export.pretokenizer import pre_tokenizer_name

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM, Qwen); this tokenizer is "
                          f"{model.get('type', 'not a fast tokenizer')}"
                          + (" with byte fallback (sentencepiece style)" if model.get("byte_fallback") else ""))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a.content: a for a in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL if token not in added else
                         TokenType.CONTROL if added[token].special else TokenType.USER_DEFINED)  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, spec, pre_tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):  # fmt: skip
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: str | Path, *, file_type: str = "f16", name: str | None = None,
               pre_tokenizer: str | None = None) -> Path:
    """Write `model` (a plain transformers causal LM) and `tokenizer` to the GGUF file `path`;
    `pre_tokenizer` overrides llama.cpp's name for the tokenizer (`pmetal.export.pretokenizer`)."""
    import gguf

    if file_type not in FILE_TYPES:
        raise ExportError(f"GGUF export has no type {file_type!r}; supported: {', '.join(FILE_TYPES)}")
    arch = architecture_of(model)
    config = model.config
    check_config(config, arch)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab_size = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[file_type]).value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, vocab_size, pre_tokenizer)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in state
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        weight = tensor.detach().float().cpu()
        if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            weight = interleave_rotary_halves(weight, heads)
        elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            weight = interleave_rotary_halves(weight, kv_heads)
        data, raw_dtype = tensor_bytes(hf_name, weight.numpy(), file_type)
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
