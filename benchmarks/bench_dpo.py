"""DPO throughput: pmetal's DpoModule beside TRL's DPOTrainer, same model, data and settings, one run.

Each trainer runs in its own subprocess (so peak memory is its own), on the same synthetic preference
pairs: fixed-length prompts and completions of random words, tokenized by a word-level tokenizer
written next to the model (one word = one token, no chat scaffolding), so both trainers see exactly
`prompt_len + completion_len + 1` (EOS) tokens per side. Settings shared by both: LoRA (rank, alpha
2r, every linear layer), beta 0.1, sigmoid loss, reference = base with the adapter off, AdamW,
gradient checkpointing on, bf16 on CUDA / fp32 on CPU. The first `--warmup` steps are not timed.

    # CPU, the embedded SmolLM2-135M-Instruct (a few minutes on 2 cores)
    python benchmarks/bench_dpo.py --device cpu --model default --batch-size 2 --prompt-len 64 \
        --completion-len 64 --steps 6 --warmup 2
    # GPU, a Qwen3-0.6B-shaped model with random weights
    python benchmarks/bench_dpo.py --device cuda --model qwen3-0.6b-shape --batch-size 8 \
        --prompt-len 256 --completion-len 256 --steps 20 --warmup 5

Trainers (`--trainers`): `pmetal` (its defaults: each pair one row holding the prompt once, reference
log-probs reused after an example's first epoch), `pmetal-plain` (chosen and rejected as separate
rows, the reference run every step: the path before the shared prompt), `trl`, and `pmetal-compile` /
`trl-compile` (the same with the decoder compiled: pmetal's `compile=True`, each decoder layer; TRL's
`torch_compile=True`), `pmetal-compile-model` (pmetal's `compile_scope="model"`: the whole decoder
stack as one graph), and `trl-precompute` (TRL's `precompute_ref_log_probs=True`: its reference pass
runs over the data set before the first step, outside the timing). `--pairs N` writes N distinct pairs
(default: one epoch, `batch_size * (steps + 1)`); fewer make the timed steps later epochs, where
pmetal reuses its reference log-probs. With `--profile DIR` each
trainer's timed steps also run under torch.profiler: DIR/<trainer>_ops.txt holds the top operators by
device time and the table gains the fraction of wall time the GPU was busy.

Prints a table (pairs/s, tokens/s, peak memory) and, with `--markdown FILE`, appends it as Markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from _common import WORDS, Profile, report, write_model_dir  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _timing import StepClock, add_worker_arguments, peak_gib, print_result, run_workers  # noqa: E402



TRAINERS = ("pmetal", "trl", "pmetal-compile", "trl-compile", "pmetal-compile-model", "pmetal-plain", "trl-precompute")


def prepare(args, work: Path) -> tuple[Path, Path]:
    """Write the model directory (weights + word-level tokenizer) and the pairs file; return both."""
    model_dir = write_model_dir(args.model, work)
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, WORDS)}" for _ in range(n))  # noqa: E731
    pairs = work / "pairs.jsonl"
    with open(pairs, "w") as f:
        for _ in range(args.pairs or args.batch_size * (args.steps + 1)):
            row = {"prompt": words(args.prompt_len), "chosen": " " + words(args.completion_len),
                   "rejected": " " + words(args.completion_len)}
            f.write(json.dumps(row) + "\n")
    return model_dir, pairs


def run_pmetal(args, model_dir: Path, pairs: Path) -> float:
    import lightning as L

    from pmetal.data.preference import PreferenceDataModule
    from pmetal.modules.dpo import DpoModule

    module = DpoModule(model=str(model_dir), beta=0.1, loss_type="sigmoid", lora_r=args.lora_r,
                       lora_alpha=2 * args.lora_r, learning_rate=1e-5, gradient_checkpointing=True,
                       weight_dtype="bfloat16" if args.device == "cuda" else "float32",
                       compile="-compile" in args._worker,
                       compile_scope="model" if args._worker.endswith("-model") else "layers",
                       **(dict(shared_prompt=False, reuse_ref_logps=False) if args._worker == "pmetal-plain" else {}))
    data = PreferenceDataModule(str(pairs), batch_size=args.batch_size, max_seq_len=args.prompt_len +
                                args.completion_len + 8)
    clock = step_clock(args)
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=args.steps,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock.lightning()])
    trainer.fit(module, datamodule=data)
    return clock.seconds()


def run_trl(args, model_dir: Path, pairs: Path) -> float:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"],
                       gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda, report_to=[], logging_steps=1000,
                       save_strategy="no", max_length=None, dataloader_num_workers=0, seed=0,
                       torch_compile=args._worker.endswith("-compile"),
                       precompute_ref_log_probs=args._worker.endswith("-precompute"))
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    clock = step_clock(args)
    trainer = DPOTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=str(pairs),
                         split="train"), processing_class=tokenizer, peft_config=peft_config, callbacks=[clock.trl()])
    trainer.train()
    return clock.seconds()


PROFILE = Profile()


def step_clock(args) -> StepClock:
    """The steps after the warmup are timed (and profiled with --profile)."""
    return StepClock(args.device, warmup=args.warmup, last=args.steps, on_timed_start=PROFILE.start,
                     on_timed_end=PROFILE.stop)


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    work = Path(args._work)
    model_dir, pairs = work / "model", work / "pairs.jsonl"
    PROFILE.setup(args.profile, args._worker, args.device)
    seconds = (run_pmetal if args._worker.startswith("pmetal") else run_trl)(args, model_dir, pairs)
    timed_pairs = args.batch_size * (args.steps - args.warmup)
    tokens = timed_pairs * 2 * (args.prompt_len + args.completion_len + 1)
    print_result({"trainer": args._worker, "pairs_per_s": timed_pairs / seconds, "tokens_per_s": tokens / seconds,
                  "peak_gib": peak_gib(args.device), "seconds": seconds, "device_busy": PROFILE.busy})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DPO throughput: pmetal vs TRL DPOTrainer")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="default",
                        help='"default" (SmolLM2-135M-Instruct), "qwen3-0.6b-shape" (random weights) or a HF dir')
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--pairs", type=int, help="distinct pairs in the data (default: one epoch of the steps)")
    parser.add_argument("--trainers", default="pmetal,trl",
                        help="comma-separated: " + ", ".join(TRAINERS))
    parser.add_argument("--profile", type=Path, help="profile the timed steps; operator tables go to this folder")
    parser.add_argument("--markdown", type=Path, help="append the table to this Markdown file")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    unknown = set(args.trainers.split(",")) - set(TRAINERS)
    if unknown:
        parser.error(f"unknown trainer(s) {sorted(unknown)}; expected {TRAINERS}")
    if args._worker:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    prepare(args, work)
    results = [r for r in run_workers(__file__, argv, args.trainers.split(","), work) if "error" not in r]
    memory = "peak GPU memory allocated (GiB)" if args.device == "cuda" else "peak RSS (GiB)"
    shape = (f"{args.model}, {args.device}, LoRA r{args.lora_r}, {args.batch_size} pairs/step, "
             f"{args.prompt_len}+{args.completion_len} tokens a side, {args.steps - args.warmup} timed steps")
    busy = lambda r: "" if r.get("device_busy") is None else f" {r['device_busy']:.0%} |"  # noqa: E731
    extra = (" GPU busy |", "---|") if args.profile else ("", "")
    table = [f"DPO throughput: {shape}", "", f"| trainer | pairs/s | tokens/s | {memory} |{extra[0]}",
             f"|---|---|---|---|{extra[1]}"]
    table += [f"| {r['trainer']} | {r['pairs_per_s']:.3f} | {r['tokens_per_s']:.1f} | {r['peak_gib']:.2f} |{busy(r)}"
              for r in results]
    report("\n".join(table) + "\n", args.markdown)


if __name__ == "__main__":
    main()
