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
    """The benchmark script as a module (it imports only the standard library at load time)."""
    if not _SCRIPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("pmetal_bench_sft", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    script = _load_script()
    if script is not None:
        script.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    script = _load_script()
    if script is None:
        raise PmetalError(
            f"the benchmark script {_SCRIPT} is missing: `pmetal bench` runs from a source checkout "
            "(git clone the project and `pip install -e .`)"
        )
    return script.run(args)
