"""Maximum context: the longest row (batch 1) that trains, found by doubling then bisection.

Every probe is one `benchmarks/bench_sft.py` worker in its own process (an out-of-memory error
cannot poison the next probe, and each peak is clean): the same model, LoRA adapter and timing as
the SFT benchmark, at batch 1 x `length` tokens, `--warmup` untimed then `--steps` timed optimizer
steps. A length "trains" when its worker finishes; out of device memory, a killed worker (host
memory) or a probe over `--probe-timeout` seconds ends the search upward. The search doubles from
`--start` until a length fails or `--max-tokens` is reached, then bisects between the last length
that trained and the first that failed until they are `--resolution` tokens apart (lengths are
multiples of 256). `--budget` bounds each variant's search in seconds (a probe is not started when
the last one's time, scaled for the longer row, would end past it): the table then says what was
reached.

Variants (bench_sft.py's): pmetal+offload (pmetal's long-row settings: fused kernels on CUDA,
layer inputs in host memory, the MLP chunked over the sequence), pmetal-default (no flags),
hf+ckpt (HF + PEFT with gradient checkpointing, full logits), trl+liger (TRL's SFTTrainer with
`use_liger_kernel=True`).

    python benchmarks/bench_context.py --device cuda --model qwen3-0.6b --lora-r 16
    python benchmarks/bench_context.py --device cuda --model llama3.1-8b --quantization nf4 --lora-r 32
    python benchmarks/bench_context.py --device cpu     # smoke: SmolLM2-135M, 512..2048 tokens, peak RSS
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GRANULE = 256
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_sft.py")
DEFAULTS = {
    "cuda": dict(model="qwen3-0.6b", variants="pmetal+offload,pmetal-default,hf+ckpt,trl+liger", start=16384,
                 max_tokens=131072, mlp_chunk=8192),
    "cpu": dict(model="default", variants="pmetal-default,pmetal+offload,hf+ckpt", start=512, max_tokens=2048,
                mlp_chunk=256),
}
OOM_MARKERS = ("out of memory", "OutOfMemoryError", "CUDA error: out of memory")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "mps"])
    parser.add_argument("--model", default=None, help="qwen3-0.6b, llama3.1-8b (random weights of that shape), "
                        "'default' (SmolLM2-135M) or a local directory; default: qwen3-0.6b on cuda, else default")
    parser.add_argument("--quantization", choices=["nf4"], default=None, help="QLoRA base (see bench_sft.py)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--variants", default=None, help="comma list of bench_sft.py variants")
    parser.add_argument("--start", type=int, default=None, help="first length probed (tokens)")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest length probed")
    parser.add_argument("--resolution", type=int, default=None, help="bisection stops when the bracket is this "
                        "narrow (default: an eighth of the last length that trained)")
    parser.add_argument("--mlp-chunk", type=int, default=None, help="tokens per MLP chunk of pmetal+offload")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per probe")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per probe")
    parser.add_argument("--probe-timeout", type=float, default=300.0, help="seconds before a probe counts as failed")
    parser.add_argument("--budget", type=float, default=None, help="seconds for each variant's whole search")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per probe")
    parser.add_argument("--json", default=None, help="also write every probe to this JSON file")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS["cuda" if args.device == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def probe(args, variant: str, length: int) -> dict:
    """One bench_sft.py worker at batch 1 x `length`: {"ok", "tok_s", "peak_gib", "seconds", "why"}."""
    command = [sys.executable, SCRIPT, "--worker", variant, "--device", args.device, "--model", args.model,
               "--seq", str(length), "--batch", "1", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--lora-r", str(args.lora_r), "--mlp-chunk", str(args.mlp_chunk)]
    if args.quantization:
        command += ["--quantization", args.quantization]
    if args.threads:
        command += ["--threads", str(args.threads)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.probe_timeout)
    except subprocess.TimeoutExpired:
        return dict(length=length, ok=False, why=f"over {args.probe_timeout:.0f} s", seconds=args.probe_timeout)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    if proc.returncode == 0 and lines and "error" not in result:
        return dict(length=length, ok=True, tok_s=result["tok_s"], peak_gib=result["peak_gib"], seconds=seconds)
    text = (result.get("error") or "") + proc.stderr[-3000:]
    if any(marker in text for marker in OOM_MARKERS):
        why = "out of memory"
    elif proc.returncode < 0:
        why = f"killed by signal {-proc.returncode} (host memory?)"
    else:
        tail = " / ".join(text.strip().splitlines()[-2:])[:200]
        why = f"failed (exit {proc.returncode}): {tail}"
    return dict(length=length, ok=False, why=why, seconds=seconds)


def _round(length: int) -> int:
    return max(GRANULE, length // GRANULE * GRANULE)


def search(args, variant: str, run_probe=probe, clock=time.perf_counter) -> dict:
    """Doubling from `args.start`, then bisection: {"best": probe or None, "capped", "probes", "budget_hit"}."""
    began, probes = clock(), []
    best, failed = None, None

    def over_budget(growth: float = 0.0) -> bool:
        """The next probe would end past the budget: the last one's time times `growth` (attention is
        quadratic: about 4 for a doubling, 1.5 for a bisection step)."""
        last = probes[-1]["seconds"] if probes else 0.0
        return args.budget is not None and clock() - began + last * growth > args.budget

    length, cap = _round(args.start), _round(args.max_tokens)
    while length <= cap and not over_budget(4.0):
        result = run_probe(args, variant, length)
        probes.append(result)
        _show(variant, result)
        if not result["ok"]:
            failed = result
            break
        best = result
        if length == cap:
            break
        length = min(_round(length * 2), cap)
    while best is not None and failed is not None and not over_budget(1.5):
        low, high = best["length"], failed["length"]
        resolution = args.resolution or max(GRANULE, low // 8)
        middle = _round((low + high) // 2)
        if high - low <= resolution or middle <= low:
            break
        result = run_probe(args, variant, middle)
        probes.append(result)
        _show(variant, result)
        if result["ok"]:
            best = result
        else:
            failed = result
    capped = best is not None and failed is None and best["length"] >= cap
    return dict(variant=variant, best=best, first_failure=failed, capped=capped, probes=probes,
                budget_hit=over_budget())


def _show(variant: str, result: dict) -> None:
    shown = (f"{result['tok_s']:,.0f} tok/s, peak {result['peak_gib']:.2f} GiB" if result["ok"] else result["why"])
    print(f"[{variant}] {result['length']:,} tokens: {shown} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)


def table(args, searches: list[dict]) -> str:
    quant = f" {args.quantization.upper()}" if args.quantization else ""
    lines = [f"{args.model}{quant}, LoRA r{args.lora_r} all-linear, batch 1, device {args.device}; "
             f"lengths {args.start:,}..{args.max_tokens:,} tokens, {args.warmup} warm-up + {args.steps} timed step(s)",
             "", "| variant | longest that trained | tokens/s there | peak GiB there | first failure | probes |",
             "|---|---:|---:|---:|---|---:|"]
    for s in searches:
        best, failure = s["best"], s["first_failure"]
        longest = "none" if best is None else (f">= {best['length']:,} (cap)" if s["capped"] else f"{best['length']:,}")
        speed = f"{best['tok_s']:,.0f}" if best else ""
        peak = f"{best['peak_gib']:.2f}" if best else ""
        why = f"{failure['length']:,}: {failure['why']}" if failure else ("budget" if s["budget_hit"] else "")
        lines.append(f"| {s['variant']} | {longest} | {speed} | {peak} | {why} | {len(s['probes'])} |")
    lines += ["", "Every probe (peak: CUDA max allocated; CPU/MPS: the worker's peak RSS / driver memory):", "",
              "| variant | tokens | trained | tokens/s | peak GiB | seconds |", "|---|---:|---|---:|---:|---:|"]
    for s in searches:
        for p in s["probes"]:
            lines.append(f"| {s['variant']} | {p['length']:,} | {'yes' if p['ok'] else p['why']} | "
                         f"{p.get('tok_s', 0):,.0f} | {p.get('peak_gib', float('nan')):.2f} | {p['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    searches = [search(args, v.strip()) for v in args.variants.split(",") if v.strip()]
    print(table(args, searches))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "searches": searches}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
