"""Export a model, adapter or run for Core ML (Neural Engine), GGUF (llama.cpp, Ollama) or transformers.

    pmetal export runs/sft-x --format gguf --out model.gguf [--quantize q8_0]
    pmetal export runs/sft-x --format coreml --out Model.mlpackage [--quantize int4] [--seq-lens 1 64]
    pmetal export runs/sft-x/final --format hf --out merged/ [--dtype bfloat16]

The source is a model (HF directory, hub id, .gguf, "default", a *-bnb-4bit checkpoint), a
LoRA/DoRA adapter directory (fused into its base first), a pmetal run directory (its final/), or a
sentence-transformers directory from `pmetal embed-train` (Core ML or HF). A QLoRA base is
dequantized before fusing, and the command says so. Outputs are written to a temporary path and
renamed, so a failed export leaves nothing at --out.
"""

from __future__ import annotations

import argparse

FORMAT_HELP = ("coreml: .mlpackage, fp16, stateful KV cache, for CPU_AND_NE (macOS 15 / iOS 18); "
               "gguf: for llama.cpp, Ollama, LM Studio; hf: fused safetensors + tokenizer")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pmetal.export.common import DTYPES, FORMATS, QUANTIZATIONS

    p.add_argument("source", nargs="?", default="default", metavar="MODEL_OR_ADAPTER",
                   help="model, adapter directory, run directory or sentence-transformers directory (default: SmolLM2)")
    p.add_argument("--format", required=True, choices=FORMATS, help=FORMAT_HELP)
    p.add_argument("--out", required=True, help="output path (.mlpackage, .gguf, or a directory for hf)")
    p.add_argument("--dtype", default=None,
                   help="; ".join(f"{f}: {', '.join(d)} (default {d[0]})" for f, d in DTYPES.items()))
    p.add_argument("--quantize", default=None,
                   help="; ".join(f"{f}: {', '.join(q)}" for f, q in QUANTIZATIONS.items() if q))
    p.add_argument("--force", action="store_true", help="replace --out when it exists")
    p.add_argument("--base", default=None, help="the adapter's base model, when not the one it records")
    g = p.add_argument_group("GGUF")
    g.add_argument("--gguf-pre-tokenizer", dest="pre_tokenizer", default=None, metavar="NAME",
                   help=export_model_doc("pre_tokenizer"))
    c = p.add_argument_group("Core ML")
    c.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="query lengths the model accepts (fixed or enumerated; default 1 64 for a decoder: "
                        "one-token decode and 64-token prefill chunks; 128 for an embedding model)")
    c.add_argument("--max-context", type=int, default=512, help="tokens the KV cache holds (default 512)")
    c.add_argument("--compute-units", default="CPU_AND_NE", choices=["CPU_AND_NE", "ALL", "CPU_AND_GPU", "CPU_ONLY"])
    p.add_argument("--trust-remote-code", action="store_true")


def export_model_doc(name: str) -> str:
    """A parameter's help from `export_model`'s docstring (read from source: `--help` stays fast)."""
    from pmetal.cli.signatures import static_settings

    return static_settings("pmetal.export.api:export_model")[name].doc


def coreml_options(args) -> dict:
    if args.format != "coreml":
        return {}
    return {"seq_lens": args.seq_lens, "max_context": args.max_context, "compute_units": args.compute_units}


def run(args) -> int:
    from pmetal.export import export_model

    result = export_model(args.source, args.format, args.out, dtype=args.dtype, quantize=args.quantize,
                          force=args.force, base=args.base, trust_remote_code=args.trust_remote_code,
                          pre_tokenizer=args.pre_tokenizer,
                          **coreml_options(args))  # fmt: skip
    for note in result.notes:
        print(f"  {note}")
    what = result.quantize or result.dtype
    print(f"exported {args.source} -> {result.path} ({result.format}, {what})", flush=True)
    return 0


ANE_HELP = ("after training, export the model for the Apple Neural Engine (Core ML .mlpackage in the run "
            "directory); training itself runs on MPS, CUDA or the CPU: PyTorch has no Neural Engine backend")  # fmt: skip


def check_ane_export() -> None:
    """Fail before training when the Core ML export could not run afterwards."""
    from pmetal.export.coreml import check_coreml_available

    check_coreml_available()


def export_for_neural_engine(result: dict, accelerator: str, name: str = "model") -> None:
    """`--ane`: export a finished run's model to `<run_dir>/<name>.mlpackage` and say plainly where
    training ran."""
    from pathlib import Path

    from pmetal.device import choose_device
    from pmetal.export import export_model

    device = choose_device(accelerator).accelerator.upper().replace("MPS", "MPS (the Apple GPU)")
    if not result.get("export_dir"):
        print("--ane: the run saved no model, so nothing was exported", flush=True)
        return
    out = Path(result["run_dir"]) / f"{name}.mlpackage"
    exported = export_model(result["export_dir"], "coreml", out, force=True)
    print(f"  training ran on {device}: PyTorch has no Neural Engine backend, so pmetal trains there and "
          "exports the result for the Neural Engine", flush=True)
    for note in exported.notes:
        print(f"  {note}", flush=True)
    print(f"  Core ML model for the Neural Engine (CPU_AND_NE, macOS 15 / iOS 18): {exported.path}", flush=True)
