"""benchmarks/bench_context.py's search: doubling then bisection to the longest length that trains,
the cap and the time budget honoured, and every probe in the table (no model runs: a fake probe)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_context.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_context_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake(limit):
    seen = []

    def run_probe(args, variant, length):
        seen.append(length)
        if length <= limit:
            return dict(length=length, ok=True, tok_s=1000.0, peak_gib=length / 1000, seconds=1.0)
        return dict(length=length, ok=False, why="out of memory", seconds=1.0)

    return run_probe, seen


def test_doubling_then_bisection_finds_the_longest_length():
    bench = _script()
    args = bench.parse_args(["--device", "cuda", "--start", "4096", "--max-tokens", "1000000", "--resolution", "1024"])
    run_probe, seen = _fake(limit=50_000)
    result = bench.search(args, "pmetal+offload", run_probe=run_probe)
    assert seen[:5] == [4096, 8192, 16384, 32768, 65536]  # doubling until the first failure
    assert all(length % 256 == 0 for length in seen)
    best, failure = result["best"]["length"], result["first_failure"]["length"]
    assert best <= 50_000 < failure and failure - best <= 1024 and not result["capped"]
    text = bench.table(args, [result])
    assert f"| pmetal+offload | {best:,} |" in text and "out of memory" in text


def test_the_cap_and_the_budget_end_the_search():
    bench = _script()
    args = bench.parse_args(["--device", "cuda", "--start", "4096", "--max-tokens", "20000"])
    run_probe, seen = _fake(limit=10**9)
    result = bench.search(args, "trl+liger", run_probe=run_probe)
    assert seen == [4096, 8192, 16384, 19968] and result["capped"]  # the cap, rounded to 256, is probed last
    assert ">= 19,968 (cap)" in bench.table(args, [result])
    ticks = iter(range(0, 1000, 10))
    args = bench.parse_args(["--device", "cuda", "--start", "4096", "--budget", "15"])
    run_probe, seen = _fake(limit=10**9)
    result = bench.search(args, "hf+ckpt", run_probe=run_probe, clock=lambda: next(ticks))
    assert result["budget_hit"] and len(seen) == 1  # 10 s spent, the next probe predicted to take 4 x 1 s more
