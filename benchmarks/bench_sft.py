"""SFT throughput: pmetal's training path against Hugging Face + PEFT (and TRL when installed).

Every variant trains the same model, data and LoRA adapter (rank 16 on all linear layers, AdamW) in
its own subprocess, so peak memory is clean (CUDA: max allocated; CPU: the worker's peak RSS). The
variants run alternately, round after round, and every one is timed the same way: a few warm-up
optimizer steps, then `--steps` steps between two device synchronizations. A variant that runs out
of GPU memory is retried with half the micro-batch and twice the gradient accumulation (same tokens
per optimizer step); the table says which micro-batch it used.

Variants (an ablation: each adds one thing):
  hf           model(**batch, labels=labels).loss: full fp32 logits, fp32 weights
  hf-amp       hf under bf16 autocast (the HF Trainer's bf16=True)
  hf+ckpt      hf with gradient checkpointing on every layer
  chunked      pmetal's chunked LM-head loss (pmetal.logps.lm_loss), fp32 weights
  chunked+bf16 ... with the frozen base weights in bf16 (LoRA weights stay fp32)
  pmetal-nockpt  chunked + bf16 weights + bf16 autocast, no checkpointing
  pmetal       chunked + bf16 weights + bf16 autocast + checkpointing (--ckpt-layers)
  pmetal+compile  pmetal + regional torch.compile of the decoder layers
  pmetal+liger   pmetal + Liger's fused RMSNorm/RoPE/SwiGLU (`--kernels liger`)
  pmetal-default `pmetal train`'s CUDA defaults: kernels "auto", compiled as a 100+ step run is
  pmetal+offload kernels "auto", layer inputs in host memory, MLP in `--mlp-chunk`-token chunks (eager)
  trl          TRL's SFTTrainer with its defaults (checkpointing and bf16 on), when trl is installed
  trl+liger    the same with `use_liger_kernel=True` (Liger's fused RMSNorm, RoPE, SwiGLU and linear
               cross-entropy), when liger-kernel is installed
A random-weight model (`--model qwen3-0.6b`) has no tokenizer: TRL gets a three-token one for its
padding, since the rows are token ids already.
With `--data variable` (row lengths uniform in [seq/8, seq]) the HF variants pad each batch and the
pmetal variants pack rows into `--batch` bins of `--seq` tokens (padding-free, per-row attention).

    python benchmarks/bench_sft.py --device cpu                       # SmolLM2-135M, 2x512
    python benchmarks/bench_sft.py --device cuda --model qwen3-0.6b   # Qwen3-0.6B shape, 16x2048
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

VARIANTS = {
    "hf": dict(loss="hf", weights="fp32", amp=False, ckpt="none"),
    "hf-amp": dict(loss="hf", weights="fp32", amp=True, ckpt="none"),
    "hf+ckpt": dict(loss="hf", weights="fp32", amp=True, ckpt="all"),
    "chunked": dict(loss="chunked", weights="fp32", amp=False, ckpt="none"),
    "chunked+bf16": dict(loss="chunked", weights="bf16", amp=False, ckpt="none"),
    "pmetal-nockpt": dict(loss="chunked", weights="bf16", amp=True, ckpt="none"),
    "pmetal": dict(loss="chunked", weights="bf16", amp=True, ckpt="@"),
    "pmetal+compile": dict(loss="chunked", weights="bf16", amp=True, ckpt="@", compile=True),
    "pmetal+liger": dict(loss="chunked", weights="bf16", amp=True, ckpt="@", kernels="liger"),
    "pmetal-default": dict(loss="chunked", weights="bf16", amp=True, ckpt="@", kernels="auto", compile="auto"),
    "pmetal+offload": dict(loss="chunked", weights="bf16", amp=True, ckpt="@", kernels="auto", offload=True),
    "trl": dict(loss="trl"),
    "trl+liger": dict(loss="trl", liger=True),
}
DEFAULT_VARIANTS = {
    "cpu": "hf,hf-amp,chunked,pmetal-nockpt,pmetal,trl",
    "cuda": "hf-amp,hf+ckpt,chunked,pmetal-nockpt,pmetal,pmetal+compile,pmetal-default,trl,trl+liger",
}
GIB = 1024**3


def parse_args(argv=None):
    from pmetal.cli.commands.bench import add_arguments  # the flags live once, with the `pmetal bench` command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- worker side


def _device(name):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _build_model(args, variant, device):
    """(model, LoraConfig): a random-shape model built on the device (`_common.RANDOM_SHAPES`) or a
    local one; with `--quantization nf4`, pmetal's variants on pmetal's NF4 layers, the others on
    bitsandbytes' (HF QLoRA)."""
    import torch
    from peft import LoraConfig

    from _common import RANDOM_SHAPES, bnb_quantize_linears, random_causal_lm

    weights = torch.bfloat16 if variant.get("weights") == "bf16" or args.quantization else torch.float32
    torch.manual_seed(0)
    if args.model in RANDOM_SHAPES:
        model = random_causal_lm(args.model, weights, device, args.attn)
    else:
        from transformers import AutoModelForCausalLM

        path = args.model
        if path == "default":
            from pmetal.models import default_model_path

            path = str(default_model_path())
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights, attn_implementation=args.attn).to(device)
    model.config.use_cache = False
    if args.quantization and variant.get("loss") == "chunked":
        from pmetal.quant.model import quantize_model

        quantize_model(model, args.quantization)
    elif args.quantization:
        bnb_quantize_linears(model, torch.bfloat16)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    if args.quantization and variant.get("loss") == "chunked":
        from pmetal.quant.peft import register_quant_lora

        register_quant_lora(lora)
    if device.type == "cuda":  # the peak is training's, not the build's (an 8B model is 16 GB in bf16 first)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return model, lora


def _rows(args, vocab_size):
    import torch

    gen = torch.Generator().manual_seed(1)
    count = args.batch * (args.warmup + args.steps)
    if args.data == "full":
        lengths = [args.seq] * count
    else:
        lengths = torch.randint(args.seq // 8, args.seq + 1, (count,), generator=gen).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=gen) for n in lengths]


def _padded_batches(rows, batch):
    import torch

    out = []
    for i in range(0, len(rows), batch):
        group = rows[i : i + batch]
        length = max(len(r) for r in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(group):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        out.append(({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)},
                    int(mask.sum())))
    return out


def _packed_batches(rows, batch, seq):
    """Rows packed padding-free into bins of `seq` tokens, `batch` bins per step stacked as
    [batch, seq] (`pmetal.data.packing.stack_packed`)."""
    from pmetal.data.packing import pack_rows, packed_collate, stack_packed

    bins = pack_rows([len(r) for r in rows], seq)
    packed = [packed_collate([{"input_ids": rows[i]} for i in b]) for b in bins]
    out = []
    for s in range(len(rows) // batch):
        group = packed[s * batch : (s + 1) * batch] or packed[-batch:]
        out.append((stack_packed(group, seq), sum(g["input_ids"].shape[1] for g in group)))
    return out, len(bins)


def _peak_bytes(device):
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _train_loop(args, variant, device, micro_batch):
    import contextlib

    import torch
    from peft import get_peft_model

    from pmetal.logps import lm_loss
    from pmetal.perf import enable_gradient_checkpointing, maybe_compile

    model, lora = _build_model(args, variant, device)
    rows = _rows(args, model.config.vocab_size)
    model = get_peft_model(model, lora).train()
    ckpt = variant["ckpt"].replace("@", args.ckpt_layers)
    if ckpt != "none":
        enable_gradient_checkpointing(model, ckpt)
    if variant.get("kernels") or variant.get("offload"):  # SftModule's own call
        from pmetal.activations import configure_long_rows

        configure_long_rows(model, kernels=variant.get("kernels", "off"), device_type=device.type,
                            offload_activations=variant.get("offload", False),
                            mlp_chunk_size=args.mlp_chunk if variant.get("offload") else None)
    if variant.get("compile") == "auto":  # as a run of AUTO_COMPILE_MIN_STEPS steps decides
        from pmetal.perf import AUTO_COMPILE_MIN_STEPS, auto_compile_decision

        eligible = not args.quantization  # as SftModule: no automatic compile on a quantized base
        if auto_compile_decision(eligible=eligible, device_type=device.type, steps=AUTO_COMPILE_MIN_STEPS)[0]:
            maybe_compile(model)
    elif variant.get("compile"):
        maybe_compile(model)
    if variant["loss"] == "chunked" and args.data == "variable":
        batches, bins = _packed_batches(rows, args.batch, args.seq)
    else:
        batches, bins = _padded_batches(rows, args.batch), None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if variant["amp"] else contextlib.nullcontext()

    def loss_of(micro):
        if variant["loss"] == "hf":
            return model(**micro).loss
        return lm_loss(model, micro, chunk_size=args.ce_chunk)[0]

    def step(batch):
        size = batch["input_ids"].shape[0]
        micro_steps = max(1, size // micro_batch)
        for m in range(micro_steps):
            rows = slice(m * micro_batch, (m + 1) * micro_batch)
            micro = {k: v[rows].to(device, non_blocking=True) for k, v in batch.items()}
            with amp:
                loss = loss_of(micro)
            (loss / micro_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for batch, _ in batches[: args.warmup]:
        step(batch)
    _sync(device)
    start = time.perf_counter()
    tokens = 0
    for batch, real_tokens in batches[args.warmup : args.warmup + args.steps]:
        loss = step(batch)
        tokens += real_tokens  # input tokens that are not padding
    _sync(device)
    seconds = time.perf_counter() - start
    return dict(tokens=tokens, seconds=seconds, loss=float(loss), bins=bins, micro_batch=micro_batch)


def _padding_tokenizer():
    """A tokenizer that only pads: TRL's collator needs one, the rows are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _trl_loop(args, device, liger=False):
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, lora = _build_model(args, {"weights": "fp32"}, device)
    tokenizer = _padding_tokenizer() if args.model == "qwen3-0.6b" else AutoTokenizer.from_pretrained(model.name_or_path)
    rows = _rows(args, model.config.vocab_size)
    dataset = Dataset.from_dict({"input_ids": [r.tolist() for r in rows]})
    times = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                _sync(device)
                times["start"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.warmup + args.steps:
                _sync(device)
                times["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=1e-4, max_length=args.seq, logging_steps=10**6, save_strategy="no", report_to=[],
            use_cpu=device.type == "cpu", dataloader_num_workers=0, seed=0, use_liger_kernel=liger,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, peft_config=lora,
                             processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    tokens = sum(len(r) for r in rows[args.warmup * args.batch :])
    return dict(tokens=tokens, seconds=times["end"] - times["start"], loss=float("nan"), bins=None,
                micro_batch=args.batch)


def run_worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    variant = VARIANTS[args.worker]
    if variant["loss"] == "trl":
        result = _trl_loop(args, device, liger=variant.get("liger", False))
    else:
        micro = args.batch
        while True:
            try:
                result = _train_loop(args, variant, device, micro)
                break
            except torch.OutOfMemoryError:
                if micro == 1:
                    return dict(variant=args.worker, error="out of memory at micro-batch 1")
                micro //= 2
                import gc

                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    result.update(variant=args.worker, peak_gib=_peak_bytes(device) / GIB, tok_s=result["tokens"] / result["seconds"])
    return result


# ----------------------------------------------------------------------------- driver side


def _defaults(args):
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.model = args.model or ("qwen3-0.6b" if gpu else "default")
    args.mlp_chunk = args.mlp_chunk or 4096
    args.seq = args.seq or (2048 if gpu else 512)
    args.batch = args.batch or (16 if gpu else 2)
    args.steps = args.steps or (6 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.variants = args.variants or DEFAULT_VARIANTS["cuda" if gpu else "cpu"]
    return args


def _environment(args) -> str:
    import peft
    import torch
    import transformers

    name = platform.processor() or platform.machine()
    if args.device == "cuda":
        name = torch.cuda.get_device_name(0)
    threads = f", {args.threads} torch thread(s) per worker" if args.threads else ""
    return (f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
            f"{os.cpu_count()} CPU cores{threads}; {datetime.date.today()}")


def _table(results, baseline, args) -> str:
    lines = [
        f"{args.model}, LoRA r{args.lora_r} all-linear, {args.batch}x{args.seq} tokens/step, data={args.data}, "
        f"attn={args.attn}, {args.steps} timed steps after {args.warmup} warm-up",
        "",
        "| variant | tokens/s | peak GiB | micro-batch | tok/s vs base | memory vs base | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = results.get(baseline)
    for name, runs in results.items():
        if "error" in runs[0]:
            lines.append(f"| {name} | {runs[0]['error']} | | | | | |")
            continue
        tok_s = max(r["tok_s"] for r in runs)  # best round: least disturbed by other load
        peak = max(r["peak_gib"] for r in runs)
        speed = mem = ""
        if base and "error" not in base[0]:
            speed = f"{tok_s / max(r['tok_s'] for r in base):.2f}x"
            mem = f"{peak / max(r['peak_gib'] for r in base):.2f}x"
        lines.append(f"| {name} | {tok_s:,.1f} | {peak:.2f} | {runs[0]['micro_batch']} | {speed} | {mem} | "
                     f"{runs[-1]['loss']:.3f} |")
    return "\n".join(lines)


def _worker_command(args, name) -> list[str]:
    """The command line of one worker: every benchmark option, spelled out."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", name]
    for key in ("device", "model", "seq", "batch", "steps", "warmup", "data", "lora_r", "ckpt_layers", "ce_chunk",
                "attn", "threads", "quantization", "mlp_chunk"):
        value = getattr(args, key)
        if value is not None:
            command += ["--" + key.replace("_", "-"), str(value)]
    return command


def run(args: argparse.Namespace) -> int:
    """Run every variant in its own process, alternating for `--rounds`, and print the table."""
    args = _defaults(args)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    for name, package in (("trl", "trl"), ("trl+liger", "trl"), ("trl+liger", "liger_kernel")):
        if name in names:
            try:
                __import__(package)
            except ImportError:
                names.remove(name)
                print(f"{package} not installed: skipping the {name} variant", file=sys.stderr)
    baseline = args.baseline or next((n for n in names if n.startswith("hf")), names[0])
    results: dict[str, list[dict]] = {n: [] for n in names}
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else list(reversed(names)):
            proc = subprocess.run(_worker_command(args, name), capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                result = dict(variant=name, error=f"failed (exit {proc.returncode}): {' / '.join(tail)[:300]}")
            else:
                result = json.loads(lines[-1][len("RESULT ") :])
            results[name].append(result)
            shown = result.get("error") or f"{result['tok_s']:,.1f} tok/s, peak {result['peak_gib']:.2f} GiB"
            print(f"[round {round_index + 1}] {name}: {shown}", file=sys.stderr, flush=True)
    print(_environment(args))
    print(_table(results, baseline, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
