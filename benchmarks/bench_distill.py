"""GKD step time: pmetal's DistillModule beside TRL's GKDTrainer, same student, teacher, data and settings.

Each trainer runs in its own subprocess (so peak memory is its own) on the same synthetic SFT rows:
a user turn of `--prompt-len` random words and an assistant turn of `--completion-len`, tokenized by
the word-level tokenizer of benchmarks/_common.py (one word = one token, a chat template that only
concatenates), written beside both random models. Shared settings: LoRA on the student (rank, alpha
2r, every linear layer), the teacher frozen in the student's dtype, generalized JSD with `--beta`,
on-policy fraction `--lmbda` (1 = every step samples `--completion-len` new tokens per row from the
student: the random models never sample the EOS word, so every row is as long in both trainers),
sampling temperature 0.9 (TRL's default), AdamW, gradient checkpointing (TRL then generates without a
KV cache, as its code does with checkpointing on; `--no-checkpointing` turns it off for both), bf16
on CUDA / fp32 on CPU. The first `--warmup` steps are not timed.

    # CPU smoke (tiny random models, a minute or two on 2 cores)
    python benchmarks/bench_distill.py --device cpu --student tiny --teacher tiny-wide --batch-size 2 \
        --prompt-len 16 --completion-len 8 --steps 3 --warmup 1
    # GPU: a Qwen3-0.6B-shaped student, a Qwen3-1.7B-shaped teacher (random bf16 weights, vocab 151,936)
    python benchmarks/bench_distill.py --device cuda --student qwen3-0.6b-shape --teacher qwen3-1.7b-shape \
        --batch-size 8 --prompt-len 256 --completion-len 256 --steps 8 --warmup 2

Prints a table (seconds per step, trained tokens/s, peak memory, and each trainer's step time
against the first one's) and, with `--markdown FILE`, appends it as Markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import QWEN3_06B_SHAPE, WORDS, report, word_tokenizer  # noqa: E402  (benchmarks/ is on sys.path)

SHAPES = {
    "qwen3-0.6b-shape": QWEN3_06B_SHAPE,
    "qwen3-1.7b-shape": dict(QWEN3_06B_SHAPE, hidden_size=2048, intermediate_size=6144),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=WORDS, tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny-wide": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, intermediate_size=256, vocab_size=WORDS, tie_word_embeddings=True,
                      max_position_embeddings=4096),
}
TRAINERS = ("pmetal", "trl")
SAMPLING_TEMPERATURE = 0.9


def write_model(shape: str, folder: Path, seed: int) -> Path:
    """A random Qwen3 model of `shape` in bf16 with the word-level tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**SHAPES[shape], bos_token_id=None, eos_token_id=2, pad_token_id=0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    word_tokenizer().save_pretrained(folder)
    return folder


def prepare(args, work: Path) -> None:
    write_model(args.student, work / "student", seed=0)
    write_model(args.teacher, work / "teacher", seed=1)
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, WORDS)}" for _ in range(n))  # noqa: E731
    with open(work / "rows.jsonl", "w") as f:
        for _ in range(args.batch_size * (args.steps + 1)):
            f.write(json.dumps({"messages": [{"role": "user", "content": words(args.prompt_len)},
                                             {"role": "assistant", "content": " " + words(args.completion_len)}]}) + "\n")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gib(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_pmetal(args, work: Path) -> float:
    import lightning as L

    from pmetal.data.distill import DistillDataModule
    from pmetal.modules.distill import DistillModule

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                _sync(args.device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == args.steps - 1:
                _sync(args.device)
                self.seconds = time.perf_counter() - self.start

    cuda = args.device == "cuda"
    module = DistillModule(model=str(work / "student"), teacher_model=str(work / "teacher"), lmbda=args.lmbda,
                           beta=args.beta, temperature=SAMPLING_TEMPERATURE, max_new_tokens=args.completion_len,
                           lora_r=args.lora_r, lora_alpha=2 * args.lora_r, learning_rate=1e-5,
                           gradient_checkpointing=args.checkpointing,
                           weight_dtype="bfloat16" if cuda else "float32")
    data = DistillDataModule(str(work / "rows.jsonl"), batch_size=args.batch_size, val_fraction=0,
                             max_seq_len=args.prompt_len + args.completion_len + 8, chat_template=None)
    timer = Timer()
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps,
                        precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    return timer.seconds


def run_trl(args, work: Path) -> float:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                _sync(args.device)
                self.start = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.steps:
                _sync(args.device)
                self.seconds = time.perf_counter() - self.start

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    student = AutoModelForCausalLM.from_pretrained(work / "student", dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(work / "student")
    config = GKDConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, learning_rate=1e-5, lmbda=args.lmbda, beta=args.beta,
                       temperature=SAMPLING_TEMPERATURE, max_new_tokens=args.completion_len,
                       max_length=args.prompt_len + args.completion_len + 8,
                       gradient_checkpointing=args.checkpointing, bf16=cuda, use_cpu=not cuda, report_to=[],
                       logging_steps=1000, save_strategy="no", dataloader_num_workers=0, seed=0)
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    timer = Timer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=load_dataset("json", data_files=str(work / "rows.jsonl"), split="train"),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    trainer.train()
    return timer.seconds


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = (run_pmetal if args.only == "pmetal" else run_trl)(args, Path(args.work))
    timed = args.steps - args.warmup
    tokens = timed * args.batch_size * args.completion_len  # trained (completion) tokens
    print("RESULT " + json.dumps({"trainer": args.only, "step_s": seconds / timed, "tokens_per_s": tokens / seconds,
                                  "peak_gib": _peak_memory_gib(args.device)}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GKD step time: pmetal DistillModule vs TRL GKDTrainer")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--student", choices=list(SHAPES), default="tiny")
    parser.add_argument("--teacher", choices=list(SHAPES), default="tiny-wide")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per step")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--completion-len", type=int, default=8, help="dataset completion = sampled tokens")
    parser.add_argument("--lmbda", type=float, default=1.0, help="on-policy fraction (1: every step samples)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--trainers", default="pmetal,trl", help="comma-separated: " + ", ".join(TRAINERS))
    parser.add_argument("--markdown", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--only", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if set(args.trainers.split(",")) - set(TRAINERS):
        parser.error(f"--trainers: expected a comma-separated subset of {TRAINERS}")
    if args.only:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    prepare(args, work)
    results = []
    for name in args.trainers.split(","):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", name,
               "--work", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
    memory = "peak GPU memory allocated (GiB)" if args.device == "cuda" else "peak RSS (GiB)"
    shape = (f"student {args.student}, teacher {args.teacher}, {args.device}, LoRA r{args.lora_r}, "
             f"{args.batch_size} rows x {args.prompt_len}+{args.completion_len} tokens, lmbda {args.lmbda}, "
             f"beta {args.beta}, checkpointing {'on' if args.checkpointing else 'off'}, "
             f"{args.steps - args.warmup} timed steps")
    first = results[0]["step_s"] if results else 1.0
    table = [f"GKD step: {shape}", "", f"| trainer | s/step | trained tokens/s | {memory} | step time vs first |",
             "|---|---|---|---|---|"]
    table += [f"| {r['trainer']} | {r['step_s']:.3f} | {r['tokens_per_s']:.1f} | {r['peak_gib']:.2f} | "
              f"{r['step_s'] / first:.2f}x |" for r in results]
    report("\n".join(table) + "\n", args.markdown)


if __name__ == "__main__":
    main()
