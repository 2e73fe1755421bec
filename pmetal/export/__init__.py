"""Exports of a trained model: Core ML for the Neural Engine, GGUF for llama.cpp/Ollama, fused HF.

- `export_model(source, format, out, dtype=, quantize=, force=)`: the `pmetal export` command.
- `load_fused(name)`: a model, adapter (fused into its dequantized base) or run as a plain model.
- `write_gguf(model, tokenizer, path, file_type=)`: GGUF with tokenizer and chat template.
- `convert_to_coreml(fused, path, ...)`, `AneDecoder`, `AneEmbedder`, `AneDecoderEmbedder`: the Core ML path.

Core layer: nothing here imports `pmetal.cli`, `pmetal.modules` or `pmetal.callbacks`. Names
resolve lazily so that importing the package costs nothing.
"""

from __future__ import annotations

from pmetal.lazy import lazy_exports

_EXPORTS = {
    "export_model": "pmetal.export.api",
    "ExportResult": "pmetal.export.api",
    "save_hf": "pmetal.export.api",
    "load_fused": "pmetal.export.source",
    "FusedModel": "pmetal.export.source",
    "load_base_for_adapter": "pmetal.export.source",
    "write_gguf": "pmetal.export.gguf",
    "convert_to_coreml": "pmetal.export.coreml",
    "check_coreml_available": "pmetal.export.coreml",
    "AneDecoder": "pmetal.export.ane",
    "AneEmbedder": "pmetal.export.ane",
    "AneDecoderEmbedder": "pmetal.export.ane",
    "ExportError": "pmetal.export.common",
    "FORMATS": "pmetal.export.common",
    "QUANTIZATIONS": "pmetal.export.common",
    "DTYPES": "pmetal.export.common",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
