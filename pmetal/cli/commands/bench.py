"""Benchmark SFT throughput: pmetal's path against Hugging Face + PEFT (and TRL when installed).

Runs benchmarks/bench_sft.py (shipped with the source tree): every variant trains the same model,
data and LoRA adapter in its own process, alternating, and a table of tokens/s and peak memory is
printed. Examples:

    pmetal bench --device cpu                          # SmolLM2-135M, 2x512 tokens per step
    pmetal bench --device cuda --model qwen3-0.6b      # Qwen3-0.6B shape, 16x2048 tokens per step
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from pmetal.errors import PmetalError

_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_sft.py"


def _load_script():
    """The benchmark script as a module, loaded only when the command runs (never to build the parser)."""
    if not _SCRIPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("pmetal_bench_sft", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (benchmarks/bench_sft.py parses its own command line with these too)."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    parser.add_argument("--model", default=None, help="'default' (SmolLM2-135M), 'qwen3-0.6b' or 'llama3.1-8b' "
                        "(random weights of that shape, built on the device), or a local HF directory; default: "
                        "qwen3-0.6b on cuda, else default")
    parser.add_argument("--quantization", choices=["nf4"], default=None, help="QLoRA: the base in NF4 (pmetal's "
                        "layers for pmetal's variants, bitsandbytes' for HF and TRL)")
    parser.add_argument("--mlp-chunk", type=int, default=None, help="tokens per MLP chunk of pmetal+offload "
                        "(default 4096)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048 on cuda, else 512)")
    parser.add_argument("--batch", type=int, default=None, help="rows per optimizer step (default 16 on cuda, else 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 6 on cuda, else 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on cuda, else 1)")
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times, alternating")
    parser.add_argument("--variants", default=None, help="comma list of variants (hf, hf-amp, chunked, pmetal, "
                        "pmetal+compile, trl, ...: the list is in benchmarks/bench_sft.py's docstring)")
    parser.add_argument("--baseline", default=None, help="variant the ratios are against (default: first hf*)")
    parser.add_argument("--data", choices=["full", "variable"], default="full", help="row lengths")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--ckpt-layers", default="all", help="checkpointed layers of the pmetal variants "
                        "(all, none, every:N, 0-11,...)")
    parser.add_argument("--ce-chunk", type=int, default=None, help="tokens per LM-head chunk (default: auto)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation for every variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default: torch's; "
                        "on a shared, loaded CPU 1 avoids OpenMP spin-waiting slowdowns)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    script = _load_script()
    if script is None:
        raise PmetalError(
            f"the benchmark script {_SCRIPT} is missing: `pmetal bench` runs from a source checkout "
            "(git clone the project and `pip install -e .`)"
        )
    return script.run(args)
