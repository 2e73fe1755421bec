"""Merge a LoRA/DoRA adapter into its base model and save full-precision weights (safetensors).

    pmetal merge --adapter runs/x/final --out merged/ [--base M] [--quantization nf4]

The same as `pmetal export ADAPTER --format hf --out DIR`, plus a merge-error report; `export`
also writes GGUF and Core ML.

With --quantization (the adapter was trained with QLoRA), the base is quantized exactly as in
training and then dequantized, so the adapter is merged into the weights it was trained against;
nothing is requantized. The merge error is reported against that reference: max / mean absolute
difference of the logits of the unmerged adapter on the dequantized base (fp32) and of the merged,
saved model, on a few prompts; `merge_report.json` in the output directory records it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain gradient descent in one sentence.",
)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + weights)")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path, else 'default')")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int8"], default=None,
                   help="the quantization the adapter was trained on (QLoRA; default: read from the adapter's "
                        "pmetal_config.json); the base is quantized then dequantized")  # fmt: skip
    p.add_argument("--quant-block-size", type=int, default=64, help="block size used in training (default 64)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="double quantization used in training (default on)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the saved weights")
    p.add_argument("--prompt", action="append", default=None, help="prompt for the merge-error check (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true")


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits.float()


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    quantization: str | None = None,
    quant_block_size: int = 64,
    double_quant: bool = True,
    dtype: str = "float32",
    prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
    trust_remote_code: bool = False,
) -> dict:
    """Merge `adapter` into its (dequantized) base and save it to `out`; returns the error report."""
    import torch

    from pmetal.export.source import load_base_for_adapter

    peft_model, tokenizer, base, quantization = load_base_for_adapter(
        adapter, base=base, quantization=quantization, quant_block_size=quant_block_size,
        double_quant=double_quant, trust_remote_code=trust_remote_code)

    tokenizer.padding_side = "right"
    batch = dict(tokenizer(list(prompts), return_tensors="pt", padding=True))
    reference = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    merged_logits = _logits(merged, batch)
    mask = batch["attention_mask"].bool()
    diff = (merged_logits - reference).abs()[mask]
    report = {
        "base": str(base),
        "adapter": str(adapter),
        "quantization": quantization,
        "dtype": dtype,
        "logits_max_abs_diff": diff.max().item(),
        "logits_mean_abs_diff": diff.mean().item(),
        "reference": "unmerged adapter on the dequantized base, float32",
    }
    from pmetal.export.common import atomic_output

    with atomic_output(Path(out), directory=True) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def run(args: argparse.Namespace) -> int:
    report = merge_adapter(
        args.adapter,
        args.out,
        base=args.base,
        quantization=args.quantization,
        quant_block_size=args.quant_block_size,
        double_quant=args.double_quant,
        dtype=args.dtype,
        prompts=args.prompt or DEFAULT_PROMPTS,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"merged {report['adapter']} into {report['base']}"
          + (f" ({report['quantization']}, dequantized)" if report["quantization"] else "")
          + f" -> {args.out} ({report['dtype']})")  # fmt: skip
    print(f"merge error vs the unmerged adapter on the dequantized base: "
          f"max |dlogit| = {report['logits_max_abs_diff']:.3g}, mean = {report['logits_mean_abs_diff']:.3g}")  # fmt: skip
    return 0
