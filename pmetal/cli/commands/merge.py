"""Merge adapters: one LoRA/DoRA adapter into its base model, or several LoRA adapters into one.

    pmetal merge --adapter runs/x/final --out merged/ [--base M] [--quantization nf4]
    pmetal merge --adapters A B ... --method ties --weights 1 1 --density 0.5 --out DIR [--fuse]

With --adapter: the same as `pmetal export ADAPTER --format hf --out DIR`, plus a merge-error
report; `export` also writes GGUF and Core ML. With --quantization (the adapter was trained with
QLoRA), the base is quantized exactly as in training and then dequantized, so the adapter is merged
into the weights it was trained against; nothing is requantized. The merge error is reported against
that reference: max / mean absolute difference of the logits of the unmerged adapter on the
dequantized base (fp32) and of the merged, saved model, on a few prompts; `merge_report.json` in
the output directory records it.

With --adapters: PEFT's add_weighted_adapter combines them into one adapter (a PEFT adapter
directory in --out), or with --fuse into a full transformers model. cat: exact sum of the weighted
updates (rank adds up); svd: that sum truncated to the largest rank; linear/dare_linear: the A and B
factors combined separately (approximate, equal ranks); ties/dare_ties: trim to --density, elect
signs, average the agreeing entries (equal ranks). See pmetal/export/merge.py.
"""

from __future__ import annotations

import argparse



def add_arguments(p: argparse.ArgumentParser) -> None:
    from pmetal.export.common import DTYPES, MERGE_METHODS

    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="PEFT adapter directory (adapter_config.json + weights) to merge into its base")
    which.add_argument("--adapters", nargs="+", metavar="ADAPTER",
                       help="LoRA adapter directories (same base) to combine into one adapter")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (the merged model, or with --adapters the adapter)")
    p.add_argument("--method", choices=MERGE_METHODS, default="cat",
                   help="--adapters: how PEFT combines them (default cat: the exact weighted sum of the updates)")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="--adapters: one weight per adapter (default 1 each)")
    p.add_argument("--density", type=float, default=None,
                   help="--adapters with ties/dare_linear/dare_ties: fraction of entries kept, in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="--adapters: seed of DARE's random drop")
    p.add_argument("--fuse", action="store_true",
                   help="--adapters: write the full model with the combined adapter fused in (loads in transformers)")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path, else 'default')")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int8"], default=None,
                   help="--adapter: the quantization the adapter was trained on (QLoRA; default: read from the "
                        "adapter's pmetal_config.json); the base is quantized then dequantized")  # fmt: skip
    p.add_argument("--quant-block-size", type=int, default=64, help="block size used in training (default 64)")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="double quantization used in training (default on)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES["hf"], default="float32", help="dtype of the saved weights")
    p.add_argument("--prompt", action="append", default=None, help="prompt for the merge-error check (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true")


def merge_adapter(*args, **kwargs) -> dict:
    """pmetal.export.merge.merge_adapter (kept importable from here)."""
    from pmetal.export.merge import merge_adapter as merge

    return merge(*args, **kwargs)


def _print_error(report: dict) -> None:
    print(f"merge error vs the unmerged adapter on the dequantized base: "
          f"max |dlogit| = {report['logits_max_abs_diff']:.3g}, mean = {report['logits_mean_abs_diff']:.3g}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pmetal.export.merge import DEFAULT_PROMPTS, merge_adapters

    prompts = args.prompt or DEFAULT_PROMPTS
    if args.adapters:
        report = merge_adapters(args.adapters, args.out, method=args.method, weights=args.weights,
                                density=args.density, fuse=args.fuse, base=args.base, dtype=args.dtype,
                                seed=args.seed, prompts=prompts, trust_remote_code=args.trust_remote_code)  # fmt: skip
        what = "a full model" if args.fuse else "one adapter"
        print(f"combined {len(args.adapters)} adapter(s) by {args.method} (weights {report['weights']}"
              + (f", density {report['density']}" if report["density"] is not None else "")
              + f") into {what} -> {args.out}")  # fmt: skip
        if args.fuse:
            _print_error(report)
        return 0
    stray = [flag for flag, given in (("--weights", args.weights), ("--density", args.density), ("--fuse", args.fuse))
             if given]  # fmt: skip
    if stray:
        from pmetal.errors import PmetalError

        raise PmetalError(f"{stray[0]} applies to --adapters (combining several); --adapter merges one into its base")
    report = merge_adapter(
        args.adapter, args.out, base=args.base, quantization=args.quantization,
        quant_block_size=args.quant_block_size, double_quant=args.double_quant, dtype=args.dtype,
        prompts=prompts, trust_remote_code=args.trust_remote_code)
    print(f"merged {report['adapter']} into {report['base']}"
          + (f" ({report['quantization']}, dequantized)" if report["quantization"] else "")
          + f" -> {args.out} ({report['dtype']})")  # fmt: skip
    _print_error(report)
    return 0
