"""How far each GGUF type moves a model, measured in llama.cpp: every type `write_gguf` writes is
exported, run by llama.cpp (`llama-cpp-python`, f32 KV cache, every position's logits) on the fixed
chat texts that `pmetal export` measures after a quantized export (`pmetal.export.agreement`), and
compared with the fp32 source model in transformers: top-1 agreement, max |logit gap|, and the file
size. A type is worth offering only when it beats a cheaper one here.

    python benchmarks/bench_gguf_agreement.py --model default --types q8_0 q5_1 q5_0 q4_1 q4_0 --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from pmetal.export.gguf import FILE_TYPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--types", nargs="+", default=list(FILE_TYPES), choices=list(FILE_TYPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dither", type=float, default=0.0,
                        help="add N(0, (DITHER * row std)^2) to every matrix first: the embedded SmolLM2 comes "
                             "from a Q4_1 file, so its layer weights lie on Q4_1's grid and q4_1 would store "
                             "them exactly; the dithered model (the source the types are compared with) does not")
    parser.add_argument("--markdown", default=None, help="append the table to this file")
    args = parser.parse_args()

    import torch

    from _common import load_fp32_causal_lm, report  # benchmarks/ is on sys.path when run as a script
    from pmetal.export import write_gguf
    from pmetal.export.agreement import measure_agreement

    tokenizer, model = load_fp32_causal_lm(args.model, args.threads)
    if args.dither:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.add_(torch.randn_like(p) * args.dither * p.std(dim=1, keepdim=True))
    lines = ["| type | top-1 agreement | max abs logit gap | positions | MB | write s |", "|---|---:|---:|---:|---:|---:|"]
    for file_type in args.types:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            path = write_gguf(model, tokenizer, Path(tmp) / "model.gguf", file_type=file_type)
            written = time.perf_counter() - start
            agreement = measure_agreement(path, model, tokenizer)
            lines.append(f"| {file_type} | {agreement.top1:.1%} | {agreement.max_gap:.3f} | {agreement.positions} | "
                         f"{path.stat().st_size / 1e6:.1f} | {written:.0f} |")
        print(lines[-1], flush=True)
    report("\n".join(lines) + f"\n\n{agreement.texts} fixed chat texts (pmetal.export.agreement.EXCHANGES), "
           "as the same token ids in llama.cpp and transformers.\n", args.markdown)


if __name__ == "__main__":
    main()
