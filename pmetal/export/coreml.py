"""Core ML export: an ML Program for the Neural Engine, with the KV cache as Core ML state.

The decoder is converted from its Neural-Engine layout (`pmetal.export.ane.AneDecoder`): float16
compute, `compute_units=CPU_AND_NE`, a macOS 15 / iOS 18 deployment target (the first with
stateful models), the `key_cache` / `value_cache` buffers as `StateType` states, and fixed or
enumerated query lengths (`seq_lens`, e.g. (1, 64): one token per decode step and 64-token
prefill chunks; the ANE runs fixed shapes, so no open ranges). Weights may then be compressed
with `coremltools.optimize`: int8 or int4 linear quantization (per channel / per 32-block), or
4/8-bit palettization (k-means lookup tables per grouped channel).

An embedding model (`pmetal embed-train`) converts as `AneEmbedder`: (input_ids, attention_mask)
of a fixed or enumerated length -> `embedding`, pooling and normalization inside.

Core ML *predictions* need macOS; conversion and the spec checks run everywhere coremltools
installs.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

from pmetal.export.common import ExportError

log = logging.getLogger("pmetal")

MIN_COREMLTOOLS = (8, 0)  # StateType and the iOS18/macOS15 target
DEFAULT_SEQ_LENS = (1, 64)
DEFAULT_MAX_CONTEXT = 512
COMPUTE_UNITS = ("CPU_AND_NE", "ALL", "CPU_AND_GPU", "CPU_ONLY")


def check_coreml_available():
    """coremltools, new enough for stateful models, on a Python it supports; else a clear error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("coremltools").setLevel(logging.ERROR)
            import coremltools as ct
    except Exception as exc:  # ImportError, or a binary that fails to load on this Python
        raise ExportError(f"the Core ML export needs coremltools >= {'.'.join(map(str, MIN_COREMLTOOLS))} "
                          f"(pip install 'coremltools>=8'); importing it failed on Python "
                          f"{sys.version.split()[0]}: {exc}") from exc  # fmt: skip
    version = tuple(int(p) for p in ct.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_COREMLTOOLS:
        raise ExportError(f"the Core ML export needs coremltools >= 8.0 for stateful KV caches; found "
                          f"{ct.__version__} (pip install -U coremltools)")  # fmt: skip
    return ct


def _shape(ct, seq_lens: tuple[int, ...]):
    if len(seq_lens) == 1:
        return (1, seq_lens[0])
    return ct.EnumeratedShapes(shapes=[(1, s) for s in seq_lens], default=(1, seq_lens[0]))


def _compress(ct, mlmodel, quantize: str | None):
    """Weight compression through coremltools.optimize."""
    if quantize is None:
        return mlmodel
    from coremltools.optimize import coreml as cto

    if quantize == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if quantize == "int4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32)
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    nbits = {"palettize4": 4, "palettize8": 8}[quantize]
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_grouped_channel", group_size=16)
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def _trace(module, example):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, example, check_trace=False)


def _convert(ct, traced, input_names: tuple[str, str], seq_lens, output, compute_units: str, states=None):
    """ct.convert with the settings every pmetal Core ML model shares: int32 token inputs of the
    fixed or enumerated lengths, an ML Program, float16 compute, the iOS 18 / macOS 15 target."""
    import numpy as np

    shape = _shape(ct, seq_lens)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=shape, dtype=np.int32) for name in input_names],
        outputs=[output],
        states=states,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        compute_units=getattr(ct.ComputeUnit, compute_units),
        skip_model_load=True,  # loading compiles the model, which needs macOS
    )


def convert_decoder(model, *, seq_lens=DEFAULT_SEQ_LENS, max_context: int = DEFAULT_MAX_CONTEXT,
                    compute_units: str = "CPU_AND_NE"):
    """The stateful Core ML model (not saved) of a HF causal LM, through its ANE layout."""
    import numpy as np

    from pmetal.export.ane import AneDecoder

    ct = check_coreml_available()
    module = AneDecoder(model, max_context=max_context).eval()
    length = seq_lens[0]
    example = (torch.zeros(1, length, dtype=torch.int32), torch.arange(length, dtype=torch.int32)[None])
    traced = _trace(module, example)
    module.reset_cache()
    cache_shape = tuple(module.key_cache.shape)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16), name=name)
              for name in ("key_cache", "value_cache")]  # fmt: skip
    return _convert(ct, traced, ("input_ids", "position_ids"), seq_lens,
                    ct.TensorType(name="logits", dtype=np.float16), compute_units, states)


def convert_embedder(model, *, pooling: str, normalize: bool, seq_lens=(128,), compute_units: str = "CPU_AND_NE"):
    import numpy as np

    from pmetal.export.ane import embedder_for

    ct = check_coreml_available()
    module = embedder_for(model, pooling, normalize).eval()
    length = seq_lens[0]
    example = (torch.ones(1, length, dtype=torch.int32), torch.ones(1, length, dtype=torch.int32))
    traced = _trace(module, example)
    return _convert(ct, traced, ("input_ids", "attention_mask"), seq_lens,
                    ct.TensorType(name="embedding", dtype=np.float32), compute_units)


def convert_to_coreml(fused, path: str | Path, *, quantize: str | None = None, seq_lens=None,
                      max_context: int = DEFAULT_MAX_CONTEXT, compute_units: str = "CPU_AND_NE") -> Path:
    """Convert a `FusedModel` and save the `.mlpackage` at `path` (the chat template, sequence
    lengths and context go into its user metadata)."""
    ct = check_coreml_available()
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ExportError(f"--out for --format coreml must end in .mlpackage, got {path.name!r}")
    if compute_units not in COMPUTE_UNITS:
        raise ExportError(f"unknown compute units {compute_units!r}; expected one of {', '.join(COMPUTE_UNITS)}")
    lens = tuple(int(s) for s in (seq_lens or ((128,) if fused.embedding else DEFAULT_SEQ_LENS)))
    if not lens or min(lens) < 1 or (not fused.embedding and max(lens) > max_context):
        raise ExportError(f"sequence lengths {lens} must be >= 1 and at most the context ({max_context})")
    try:
        if fused.embedding is not None:
            mlmodel = convert_embedder(fused.model, seq_lens=lens, compute_units=compute_units, **fused.embedding)
        else:
            mlmodel = convert_decoder(fused.model, seq_lens=lens, max_context=max_context, compute_units=compute_units)
        mlmodel = _compress(ct, mlmodel, quantize)
    except ExportError:
        raise
    except Exception as exc:  # a coremltools failure deep in its converter: say what it was converting
        raise ExportError(f"coremltools could not convert {fused.source} "
                          f"({type(fused.model).__name__}): {type(exc).__name__}: {exc}") from exc  # fmt: skip
    mlmodel.short_description = f"pmetal export of {fused.source}"
    meta = mlmodel.user_defined_metadata
    meta["pmetal.source"] = str(fused.source)
    meta["pmetal.seq_lens"] = ",".join(map(str, lens))
    if fused.embedding is None:
        meta["pmetal.max_context"] = str(max_context)
        template = getattr(fused.tokenizer, "chat_template", None)
        if template:
            meta["pmetal.chat_template"] = template
    mlmodel.save(str(path))
    return path
