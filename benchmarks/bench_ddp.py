"""SFT and GRPO throughput on 1 or N devices through pmetal's distributed path (`--devices N --strategy ddp|fsdp`).

    python benchmarks/bench_ddp.py --devices 2 --strategy ddp --strategy fsdp   # 2 GPUs, both strategies
    python benchmarks/bench_ddp.py --devices 1 --strategy ddp                   # the one-GPU DDP overhead
    python benchmarks/bench_ddp.py --method grpo --devices 2 --strategy ddp --batch-size 8   # 16 prompts x 8
    python benchmarks/bench_ddp.py --model tiny --accelerator cpu --devices 2 --strategy ddp --steps 4

Every configuration runs in a fresh `python -m pmetal train` (Lightning starts the other
processes), LoRA r16 on the Qwen3-0.6B shape (random bf16 weights, word-level tokenizer) with
`--batch-size` packed rows of `--seq-len` tokens per device and step. A baseline row (one
device, no strategy) always runs first. Prints a table: tokens/s over the timed steps (after
`--warmup`), scaling against the baseline, peak memory per device, and the loss at the last step
(equal global batches give equal curves).

`--method grpo` runs `pmetal grpo` instead: `--batch-size` prompts per device with
`--num-generations` completions each; the baseline takes the same global batch on one device
(batch × devices prompts), and the table shows rollout tokens/s (all ranks) and seconds per step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def write_data(path: Path, rows: int, seq_len: int, prompts_only: bool = False) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            words = lambda n: " ".join(f"w{rng.randrange(3, 8000)}" for _ in range(n))  # noqa: E731
            row = {"prompt": words(seq_len)} if prompts_only else {"prompt": words(8), "completion": words(seq_len - 12)}
            f.write(json.dumps(row) + "\n")
    return path


def write_tiny_model(work: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from _common import word_tokenizer

    model_dir = work / "model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    word_tokenizer().save_pretrained(model_dir)
    return model_dir


class StepTimer:
    """A callback: wall time of the optimizer steps after `warmup`, and peak memory, written by rank 0."""

    def __init__(self, path: str, warmup: int) -> None:
        self.path, self.warmup, self.times = path, warmup, []

    def __call__(self):
        import time

        import torch
        from lightning.pytorch import Callback

        timer = self

        class _Timer(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if pl_module.device.type == "cuda":
                    torch.cuda.synchronize()
                timer.times.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):
                peak = torch.cuda.max_memory_allocated() / 2**30 if pl_module.device.type == "cuda" else float("nan")
                peaks = trainer.strategy.all_gather(torch.tensor(peak, device=pl_module.device)).reshape(-1).tolist()
                if trainer.is_global_zero:
                    Path(timer.path).write_text(json.dumps({"times": timer.times, "peaks": peaks,
                                                            "world": trainer.world_size}))

        return _Timer()


def run_config(args, work: Path, model_dir: Path, data: Path, devices: int, strategy: str, batch_size: int) -> dict:
    name = f"{strategy}-{devices}"
    out = work / name
    timing = work / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "BENCH_DDP_TIMING": str(timing), "BENCH_DDP_WARMUP": str(args.warmup)}
    env.pop("PMETAL_RUN_DIR", None)
    cmd = [sys.executable, str(Path(__file__)), "--worker", "--model-dir", str(model_dir), "--dataset", str(data),
           "--devices", str(devices), "--strategy", strategy, "--steps", str(args.steps),
           "--batch-size", str(batch_size), "--seq-len", str(args.seq_len), "--accelerator", args.accelerator,
           "--output-dir", str(out), "--method", args.method, "--num-generations", str(args.num_generations),
           "--max-completion-length", str(args.max_completion_length)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"config": name, "error": proc.stderr[-2000:]}
    result = json.loads(timing.read_text())
    times = result["times"][args.warmup:]
    steps = len(times) - 1
    seconds = (times[-1] - times[0]) / steps if steps > 0 else float("nan")
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    if args.method == "grpo":  # logged per rank and averaged over the ranks: x world for all of them
        rates = [float(r["train/rollout/tokens_per_s"]) for r in rows if r.get("train/rollout/tokens_per_s")][args.warmup:]
        rate = sum(rates) / max(len(rates), 1) * result["world"]
    else:
        rate = batch_size * args.seq_len * result["world"] / seconds
    return {"config": name, "tokens_per_s": rate, "step_s": seconds, "peak_gib": max(result["peaks"]),
            "last_loss": losses[-1] if losses else float("nan"), "world": result["world"]}


def worker(args) -> None:
    """One run through `pmetal train` (as a user would), with the step timer added."""
    from pmetal.cli import runner

    timer = StepTimer(os.environ["BENCH_DDP_TIMING"], int(os.environ["BENCH_DDP_WARMUP"]))
    launch = runner.launch  # the commands import it from the runner when they run
    runner.launch = lambda *a, **k: launch(*a, **{**k, "callbacks": [timer()]})
    argv = ["--model", args.model_dir, "--dataset", args.dataset, "--batch-size", str(args.batch_size),
            "--max-steps", str(args.steps), "--devices", str(args.devices), "--output-dir", args.output_dir,
            "--no-progress-bar", "--checkpoint-every", "100000", "--accelerator", args.accelerator,
            "--learning-rate", "1e-4"]
    if args.method == "grpo":
        argv += ["--reward-fn", "length", "--num-generations", str(args.num_generations),
                 "--max-completion-length", str(args.max_completion_length), "--max-prompt-length", str(args.seq_len)]
    else:
        argv += ["--max-seq-len", str(args.seq_len), "--val-fraction", "0"]
    if args.strategy != "none":
        argv += ["--strategy", args.strategy]
    from pmetal.cli.dispatch import main

    sys.exit(main(["train" if args.method == "sft" else "grpo", *argv]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["sft", "grpo"], default="sft")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--strategy", action="append", choices=["ddp", "fsdp", "none"], default=None)
    p.add_argument("--model", default="qwen3-0.6b-shape", help="qwen3-0.6b-shape, tiny, or a model directory")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16, help="packed rows per device per step")
    p.add_argument("--seq-len", type=int, default=2048, help="SFT: tokens per packed row; GRPO: prompt tokens")
    p.add_argument("--num-generations", type=int, default=8, help="GRPO: completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=256, help="GRPO: new tokens per completion")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.strategy = args.strategy[0]
        return worker(args)
    work = Path(tempfile.mkdtemp(prefix="bench_ddp-"))
    if args.model == "tiny":
        model_dir = write_tiny_model(work)
    else:
        from _common import write_model_dir

        model_dir = write_model_dir(args.model, work)
    rows = args.batch_size * args.devices * (args.steps + 2)
    data = write_data(work / "data.jsonl", rows, args.seq_len, prompts_only=args.method == "grpo")
    # SFT: the same batch per device (weak scaling); GRPO: the same global batch (strong scaling)
    base_batch = args.batch_size * (args.devices if args.method == "grpo" else 1)
    configs = [(1, "none", base_batch)] + [(args.devices, s, args.batch_size) for s in (args.strategy or ["ddp"])]
    results = [run_config(args, work, model_dir, data, *config) for config in configs]
    base = results[0].get("tokens_per_s")
    what = "rollout tokens/s" if args.method == "grpo" else "tokens/s"
    print(f"| {args.method} config | devices | {what} | vs 1 device, no strategy | s/step | peak GiB per device | "
          f"loss at step {args.steps} |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | | failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'} | | | | |")
            continue
        print(f"| {r['config']} | {r['world']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['step_s']:.3f} | {r['peak_gib']:.2f} | {r['last_loss']:.4f} |")


if __name__ == "__main__":
    main()
