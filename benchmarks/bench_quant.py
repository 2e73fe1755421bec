"""Quantization benchmark: per-layer quantize time, dequantize+matmul vs dense matmul, and whole-model
QLoRA training (tokens/s, peak memory) against LoRA and, where installed, bitsandbytes' QLoRA.

    CPU (SmolLM2-135M):  python benchmarks/bench_quant.py --device cpu --steps 3 --batch-size 2 --seq-len 256
    GPU (Qwen3-0.6B shape, random weights, beside bitsandbytes):
        python benchmarks/bench_quant.py --device cuda --model qwen3-0.6b-shape --batch-size 8 --seq-len 1024 --steps 10

Each training variant runs in its own subprocess so its peak memory is its own (CUDA: max allocated,
and max reserved after the loader's cached blocks are released; CPU: peak RSS). `--alloc-conf`
sets PYTORCH_CUDA_ALLOC_CONF for every variant alike (e.g. "expandable_segments:True", which
pmetal's CLI uses by default; the default allocator leaves up to 1 MiB of a block unsplit per
allocation, so equal tensors can read up to ~1 MiB apart). The loss is pmetal's chunked `lm_loss` for every variant, LoRA r16 on all linear layers,
AdamW, gradient checkpointing, bf16 autocast on CUDA (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=4096)  # fmt: skip
VARIANTS = ("lora", "pmetal-nf4", "pmetal-nf4-compiled", "pmetal-int8", "bnb-nf4")
# also accepted by --variants: "lora-peft-cast", "pmetal-nf4-peft-cast" (PEFT's fp32 copy of each adapter input, as before)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, repeat=10, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat


def _has_bnb(device) -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def layer_benchmarks(args) -> list[dict]:
    from pmetal.quant import functional as QF
    from pmetal.quant.linear import QuantLinear, compile_dequantize

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out_f, in_f = args.layer_shape
    w = torch.randn(out_f, in_f, device=device) * 0.02
    x = torch.randn(args.batch_size * args.seq_len, in_f, device=device, dtype=dtype)
    rows = []
    for quant_type in ("nf4", "fp4", "int8"):
        t = _timeit(lambda: QF.quantize(w, quant_type, 64, True), device, repeat=3, warmup=1)
        rows.append({"op": f"quantize {quant_type} (pmetal)", "ms": t * 1e3})
    if _has_bnb(device):
        import bitsandbytes.functional as bnbf

        t = _timeit(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), device, 3, 1)
        rows.append({"op": "quantize nf4 (bitsandbytes)", "ms": t * 1e3})
    dense = w.to(dtype)
    rows.append({"op": f"matmul {str(dtype)[6:]} dense", "ms": _timeit(lambda: x @ dense.T, device) * 1e3})
    if dtype != torch.float32:
        w32, x32 = w.float(), x.float()
        rows.append({"op": "matmul float32 dense", "ms": _timeit(lambda: x32 @ w32.T, device) * 1e3})
    for quant_type in ("nf4", "int8"):
        layer = QuantLinear.from_weight(w, quant_type=quant_type, backend="pmetal")
        rows.append({"op": f"dequant {quant_type} (pmetal)", "ms": _timeit(lambda: layer.dequantize(dtype), device) * 1e3})
        rows.append({"op": f"dequant+matmul {quant_type} (pmetal)", "ms": _timeit(lambda: layer(x), device) * 1e3})
    if device == "cuda":
        layer = QuantLinear.from_weight(w, quant_type="nf4", backend="pmetal")
        compile_dequantize(True)
        rows.append({"op": "dequant+matmul nf4 (pmetal, compiled)", "ms": _timeit(lambda: layer(x), device) * 1e3})
        compile_dequantize(False)
    if _has_bnb(device):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=True)
        rows.append({"op": "dequant nf4 (bitsandbytes)", "ms": _timeit(lambda: bnbf.dequantize_4bit(packed, state), device) * 1e3})
        rows.append({"op": "dequant+matmul nf4 (bitsandbytes)",
                     "ms": _timeit(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), device) * 1e3})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# whole-model training (one variant per subprocess)


def _model_dir(args, tmp: Path) -> Path:
    if args.model == "qwen3-0.6b-shape":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        target = tmp / "qwen3-0.6b-shape"
        if not (target / "config.json").exists():
            torch.manual_seed(0)
            with torch.device("cpu"):
                model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_06B, dtype="bfloat16")).to(torch.bfloat16)
            model.save_pretrained(target, safe_serialization=True)
            del model
        return target
    if args.model == "smollm2":
        from pmetal.models import default_model_path

        return Path(default_model_path())
    return Path(args.model)


def _tensor_bytes(model) -> int:
    """Bytes of the distinct CUDA storages of the model: parameters, buffers and bitsandbytes'
    quantization states (which are attributes, not buffers), each rounded to the allocator's 512 B."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        state = getattr(module._parameters.get("weight"), "quant_state", None)  # not QuantLinear.weight (a copy)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cuda}
    return sum(-(-n // 512) * 512 for n in storages.values())


def train_variant(args, variant: str, model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from pmetal.logps import lm_loss
    from pmetal.quant import load_quantized_model, prepare_peft, quantized_memory
    from pmetal.quant.linear import compile_dequantize

    device = args.device
    base_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if variant in ("lora", "lora-peft-cast"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=base_dtype).to(device)
    elif variant.startswith("pmetal"):  # pmetal-nf4, pmetal-nf4-compiled, pmetal-nf4-peft-cast, pmetal-int8
        quant_type = "int8" if "int8" in variant else "nf4"
        model = load_quantized_model(model_dir, quant_type, dtype=base_dtype, device=device, backend="pmetal")
        if variant == "pmetal-nf4-compiled":
            compile_dequantize(True)
    elif variant == "bnb-nf4":
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=base_dtype)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=base_dtype,
                                                     device_map={"": device})  # fmt: skip
    else:
        raise SystemExit(f"unknown variant {variant}")
    slack = 0.0
    if device == "cuda":
        # Bytes the CUDA caching allocator counts beyond the tensors themselves (blocks it did not
        # split, an effect of the order of the loading's allocations): reported apart.
        slack = torch.cuda.memory_allocated() - _tensor_bytes(model)
        torch.cuda.empty_cache()  # the loader's cached transient blocks: not the training's memory
        torch.cuda.reset_peak_memory_stats()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_model = prepare_peft(model, r=16)
    # from_pretrained returns eval mode, and transformers checkpoints layers only in training mode
    # (the first recorded runs of this benchmark were in eval mode, i.e. without checkpointing).
    peft_model.train()
    if variant.endswith("peft-cast"):  # what pmetal did before pmetal.lora_autocast: PEFT's fp32 input copy
        for module in peft_model.modules():
            if hasattr(module, "lora_A"):
                module._cast_input_dtype = lambda x, dtype: x if x is None or x.dtype == dtype else x.to(dtype)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _ = lm_loss(peft_model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    seconds = _timeit(step, device, repeat=args.steps, warmup=args.warmup)
    busy = None
    if args.profile:  # a few more steps under torch.profiler, after the timing (which it would slow)
        from _common import Profile  # benchmarks/ is on sys.path when run as a script

        profile = Profile()
        profile.setup(args.profile, variant, device)
        profile.start()
        for _ in range(3):
            step()
        _sync(device)
        profile.stop()
        busy = profile.busy
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"variant": variant, "step_s": seconds, "tokens_per_s": args.batch_size * args.seq_len / seconds,
           "peak_gib": peak, "device_busy": busy}  # fmt: skip
    if device == "cuda":
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        row["load_slack_mib"] = slack / 2**20
        row["peak_tensors_gib"] = peak - slack / 2**30
    if variant.startswith("pmetal"):
        row["bytes_per_param"] = quantized_memory(model)["bytes_per_param"]
    return row


def load_variant(args, variant: str, model_dir: Path) -> dict:
    """Time and memory of loading the model quantized, the way training loads it ("load-layerwise":
    `load_model_and_tokenizer(quantization="nf4")`) or the whole model first and then quantized on
    the CPU and moved ("load-whole", what pmetal did before). Host memory is the peak anonymous RSS
    (sampled every 5 ms: mapped checkpoint pages are not counted)."""
    import threading

    from pmetal.models import load_model_and_tokenizer

    def anon_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("RssAnon")) / 1024

    peak, done = [anon_mib()], threading.Event()
    before = peak[0]

    def watch():
        while not done.wait(0.005):
            peak[0] = max(peak[0], anon_mib())

    watcher = threading.Thread(target=watch, daemon=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    watcher.start()
    start = time.perf_counter()
    if variant == "load-layerwise":
        model, _ = load_model_and_tokenizer(model_dir, dtype=dtype, quantization="nf4")
        model.to(args.device)
    else:
        from transformers import AutoModelForCausalLM

        from pmetal.quant import quantize_model

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        quantize_model(model, "nf4", compute_dtype=dtype).to(args.device)
    _sync(args.device)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    row = {"variant": variant, "load_s": seconds, "host_peak_mib": peak[0] - before}
    if args.device == "cuda":
        row["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["gpu_after_mib"] = torch.cuda.memory_allocated() / 2**20
    return row


def _run_variant(command: list[str], variant: str, env: dict | None = None) -> dict:
    """Run one variant in a child process; its JSON row, or the last line of its error."""
    done = subprocess.run(command + ["--_variant", variant], capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"variant": variant, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(lines[-1])


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "" if value is None else str(value)


def _print_table(rows, columns):
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(_cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--model", default=None, help="smollm2 | qwen3-0.6b-shape | HF directory (default: smollm2 on CPU, "
                                                 "qwen3-0.6b-shape on CUDA)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layer-shape", type=int, nargs=2, default=(3072, 1024), metavar=("OUT", "IN"))
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {VARIANTS}")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep every layer's activations (no gradient checkpointing)")
    p.add_argument("--alloc-conf", default=None, metavar="CONF",
                   help='PYTORCH_CUDA_ALLOC_CONF for every training variant, e.g. "expandable_segments:True" '
                        '(default: inherited from this process)')
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after timing, profile 3 steps of each variant; operator tables go to DIR/<variant>_ops.txt")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--loading", action="store_true",
                   help="also compare loading the model quantized: layer by layer vs. whole model first")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("qwen3-0.6b-shape" if args.device == "cuda" else "smollm2")

    if args._variant:  # child process: one training or loading variant
        run = load_variant if args._variant.startswith("load-") else train_variant
        print(json.dumps(run(args, args._variant, Path(args._model_dir))))
        return 0

    results = {"device": args.device, "model": args.model, "batch": [args.batch_size, args.seq_len]}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    print(f"# bench_quant on {results.get('gpu', args.device)}: model {args.model}, batch {args.batch_size}x{args.seq_len}")
    if not args.skip_layers:
        rows = layer_benchmarks(args)
        results["layers"] = rows
        print(f"\n## one layer {tuple(args.layer_shape)}, x = {args.batch_size * args.seq_len} tokens")
        _print_table(rows, ["op", "ms"])
    if not args.skip_training:
        variants = args.variants or [v for v in VARIANTS if (v != "bnb-nf4" or _has_bnb(args.device))
                                     and (v != "pmetal-nf4-compiled" or args.device == "cuda")]  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = _model_dir(args, Path(tmp))
            base = [sys.executable, __file__, "--device", args.device, "--model", args.model, "--batch-size",
                    str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--_model-dir", str(model_dir)]  # fmt: skip
            if not args.checkpointing:
                base.append("--no-checkpointing")
            if args.profile:
                base += ["--profile", str(args.profile)]
            env = dict(os.environ)
            if args.alloc_conf is not None:
                env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
            rows = [_run_variant(base, variant, env) for variant in variants]
        # A variant may be listed several times (run alternately): its k-th run is compared with the
        # k-th run of the reference (or the last one), the closest in time.
        timed = [r for r in rows if "step_s" in r]
        seen: dict[str, int] = {}
        for r in timed:
            k = seen[r["variant"]] = seen.get(r["variant"], -1) + 1
            for ref, column in (("lora", "time_vs_lora"), ("bnb-nf4", "time_vs_bnb")):
                refs = [x for x in timed if x["variant"] == ref]
                if refs:
                    r[column] = r["step_s"] / refs[min(k, len(refs) - 1)]["step_s"]
        results["training"] = rows
        mode = "checkpointing" if args.checkpointing else "no checkpointing"
        results["checkpointing"] = args.checkpointing
        results["alloc_conf"] = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
        print(f"\n## QLoRA training step (LoRA r16 all-linear, {mode}), {args.steps} timed steps, "
              f"PYTORCH_CUDA_ALLOC_CONF={results['alloc_conf'] or '(default)'}")
        _print_table(rows, ["variant", "step_s", "tokens_per_s", "peak_gib", "peak_reserved_gib", "load_slack_mib",
                            "peak_tensors_gib",
                            "bytes_per_param", "time_vs_lora", "time_vs_bnb", "device_busy", "error"])  # fmt: skip
    if args.loading:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = _model_dir(args, Path(tmp))
            if not (model_dir / "tokenizer_config.json").exists():  # a random-weight model: any tokenizer
                sys.path.insert(0, str(Path(__file__).parent))
                from _common import word_tokenizer

                word_tokenizer().save_pretrained(model_dir)
            base = [sys.executable, __file__, "--device", args.device, "--model", args.model, "--_model-dir", str(model_dir)]
            rows = [_run_variant(base, v) for v in ("load-layerwise", "load-whole", "load-layerwise", "load-whole")]
        results["loading"] = rows
        print("\n## loading the model NF4-quantized")
        _print_table(rows, ["variant", "load_s", "host_peak_mib", "gpu_peak_mib", "gpu_after_mib", "error"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
