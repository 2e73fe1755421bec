"""`export_model`: one entry point for every format, used by `pmetal export` and from Python.

    from pmetal.export import export_model
    export_model("runs/sft-x", "gguf", "model.gguf", quantize="q8_0")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pmetal.atomic import write_text_atomic
from pmetal.export.common import QUANTIZATIONS, ExportError, atomic_output, check_options, check_out, write_errors
from pmetal.export.source import FusedModel, load_fused

if TYPE_CHECKING:
    from pmetal.export.agreement import Agreement


@dataclass
class ExportResult:
    path: Path
    format: str
    dtype: str
    quantize: str | None
    notes: list[str] = field(default_factory=list)
    agreement: Agreement | None = None  # a quantized GGUF run in llama.cpp against its source model


def save_hf(fused: FusedModel, path: Path, dtype: str = "float32", trust_remote_code: bool = False) -> Path:
    """Fused safetensors and the tokenizer: `AutoModelForCausalLM.from_pretrained(path)` loads it.
    An embedding model is also a sentence-transformers directory (its pooling and normalization
    kept), so `SentenceTransformer(path)` gives the same embeddings and `AutoModel` loads it too."""
    model = fused.model.to(getattr(torch, dtype))
    if fused.embedding is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(fused.source, device="cpu", trust_remote_code=trust_remote_code)
        st[0].auto_model = model
        st.save(str(path))
        return path
    model.save_pretrained(path, safe_serialization=True)
    fused.tokenizer.save_pretrained(path)
    return path


def save_gguf(fused: FusedModel, out: Path, file_type: str, pre_tokenizer: str | None = None):
    """The GGUF, its Ollama Modelfile beside it, and for a quantized type the agreement of the file,
    run in llama.cpp, with the model it came from (None when not measured; `fused.notes` says why)."""
    from pmetal.export.agreement import llama_cpp_available, measure_agreement
    from pmetal.export.gguf import write_gguf
    from pmetal.export.modelfile import modelfile_path, modelfile_text

    with atomic_output(out, directory=False) as staging:
        write_gguf(fused.model, fused.tokenizer, staging, file_type=file_type, pre_tokenizer=pre_tokenizer)
    text, note = modelfile_text(out.name, fused.tokenizer)
    write_text_atomic(modelfile_path(out), text)
    fused.notes.append(f"Ollama Modelfile beside it: {modelfile_path(out)} (ollama create NAME -f {modelfile_path(out).name})")
    if note:
        fused.notes.append(note)
    if file_type not in QUANTIZATIONS["gguf"]:
        return None
    if not llama_cpp_available():
        fused.notes.append(f"{file_type} agreement with the source model not measured: install llama-cpp-python "
                           "(the README's set-up) to run the file in llama.cpp")  # fmt: skip
        return None
    agreement = measure_agreement(out, fused.model, fused.tokenizer)
    fused.notes.append(f"{file_type}: {agreement}")
    return agreement


def tokenizer_path(mlpackage: Path) -> Path:
    """Where a Core ML export's tokenizer goes: `<name>-tokenizer/` beside `<name>.mlpackage`."""
    return mlpackage.with_name(mlpackage.stem + "-tokenizer")


def export_model(
    source: str | Path | FusedModel,
    format: str,
    out: str | Path,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    base: str | None = None,
    trust_remote_code: bool = False,
    pre_tokenizer: str | None = None,
    **coreml_options,
) -> ExportResult:
    """Export a model, adapter or run directory (or an already loaded `FusedModel`).

    Args:
        source: anything `load_fused` takes (model, adapter, run directory, sentence-transformers dir).
        format: "coreml", "gguf" or "hf".
        out: the output path (`.mlpackage`, `.gguf`, or a directory); written atomically.
        dtype: weights: hf float32/bfloat16/float16; gguf f16/f32/bf16; coreml float16.
        quantize: gguf q8_0/q5_1/q4_1/q4_0; coreml int8/int4/palettize4/palettize8 (coremltools.optimize).
        force: replace an existing `out`.
        base: the adapter's base model when it is not the one it records.
        trust_remote_code: allow the model repository's own code.
        pre_tokenizer: gguf: llama.cpp's name for the tokenizer's pre-tokenizer (tokenizer.ggml.pre, e.g.
            llama-bpe, qwen2, smollm, gpt-2), for a tokenizer pmetal does not recognise (default: found
            from the tokenizer, as llama.cpp's converter finds it).
        coreml_options: `seq_lens`, `max_context`, `compute_units`, for `pmetal.export.coreml`.
    """
    dtype = check_options(format, dtype, quantize)
    out = check_out(out, force)
    if format == "coreml":
        from pmetal.export.coreml import check_coreml_available

        check_coreml_available()  # before minutes of loading
    elif coreml_options:
        raise ExportError(f"{', '.join(coreml_options)}: Core ML options, not for --format {format}")
    if pre_tokenizer and format != "gguf":
        raise ExportError(f"--gguf-pre-tokenizer is for --format gguf, not --format {format}")
    if format == "gguf":
        from pmetal.export.modelfile import modelfile_path

        check_out(modelfile_path(out), force)
    agreement = None
    fused = source if isinstance(source, FusedModel) else load_fused(source, base=base, trust_remote_code=trust_remote_code)
    with write_errors(out, fused.model, quantize or dtype):  # a full disk or read-only target: one line
        if format == "hf":
            with atomic_output(out, directory=True) as staging:
                save_hf(fused, staging, dtype, trust_remote_code)
        elif format == "gguf":
            if fused.embedding is not None:
                raise ExportError("GGUF export writes causal language models; this is a sentence-embedding model "
                                  "(export it with --format coreml or hf)")  # fmt: skip
            agreement = save_gguf(fused, out, quantize or dtype, pre_tokenizer)
        else:
            from pmetal.export.coreml import convert_to_coreml

            with atomic_output(out, directory=False) as staging:
                convert_to_coreml(fused, staging, quantize=quantize, **coreml_options)
            tokenizer_dir = tokenizer_path(out)  # the app needs the tokenizer; a package holds only the model
            with atomic_output(tokenizer_dir, directory=True) as staging:
                fused.tokenizer.save_pretrained(staging)
            fused.notes.append(f"tokenizer saved beside the model: {tokenizer_dir}")
    return ExportResult(out, format, dtype, quantize, list(fused.notes), agreement)
