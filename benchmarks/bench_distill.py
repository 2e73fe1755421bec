"""GKD step time: pmetal's DistillModule beside TRL's GKDTrainer, same student, teacher, data and settings.

Each trainer runs in its own subprocess (so peak memory is its own) on the same synthetic SFT rows:
a user turn of `--prompt-len` random words and an assistant turn of `--completion-len`, tokenized by
the word-level tokenizer of benchmarks/_common.py (one word = one token, a chat template that only
concatenates), written beside both random models (built on the GPU under `--device cuda`: seconds,
where a 1.7B model's random init on the CPU takes tens). Shared settings: LoRA on the student (rank,
alpha 2r, every linear layer), the teacher frozen in the student's dtype, generalized JSD with
`--beta`, on-policy fraction `--lmbda` (1 = every step samples `--completion-len` new tokens per row
from the student: the random models never sample the EOS word, so every row is as long in both
trainers), sampling temperature 0.9 (TRL's default), AdamW, gradient checkpointing (TRL's default;
TRL then generates without a KV cache, as its code does with checkpointing on; `--no-checkpointing`
turns it off for both), bf16 on CUDA / fp32 on CPU. The first `--warmup` steps are not timed (pmetal's
first step compiles the rollout engine's round on CUDA).

Each step is split into the student's sampling (`generate`: pmetal's rollout engine, TRL's
`generate_on_policy_outputs`, HF `generate`), the teacher's forward and the rest (the student's
forward, the divergence, backward and optimizer step); a second table gives these per step with
each worker's first step, set-up (imports, both models' loads) and whole time, so a run that is
too long shows where it went.

    # CPU smoke (tiny random models, about a minute on 2 shared cores)
    python benchmarks/bench_distill.py --device cpu --student tiny --teacher tiny-wide --batch-size 2 \
        --prompt-len 16 --completion-len 8 --steps 3 --warmup 1
    # GPU: a Qwen3-0.6B-shaped student, a Qwen3-1.7B-shaped teacher (random bf16 weights, vocab 151,936),
    # sized to finish in under 150 s with TRL
    python benchmarks/bench_distill.py --device cuda --student qwen3-0.6b-shape --teacher qwen3-1.7b-shape \
        --batch-size 8 --prompt-len 128 --completion-len 128 --steps 3 --warmup 1

Prints the tables and, with `--markdown FILE`, appends them as Markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import SHAPES, WORDS, report, write_model_dir  # noqa: E402  (benchmarks/ is on sys.path)
from _timing import StepClock, add_worker_arguments, peak_gib, print_result, run_workers  # noqa: E402

TRAINERS = ("pmetal", "trl")
SAMPLING_TEMPERATURE = 0.9
PHASES = ("generate", "teacher")  # timed inside each step; the rest is the student's forward, loss, backward, step


def prepare(args, work: Path) -> None:
    write_model_dir(args.student, work, name="student", seed=0, device=args.device)
    write_model_dir(args.teacher, work, name="teacher", seed=1, device=args.device)
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, WORDS)}" for _ in range(n))  # noqa: E731
    with open(work / "rows.jsonl", "w") as f:
        for _ in range(args.batch_size * (args.steps + 1)):
            f.write(json.dumps({"messages": [{"role": "user", "content": words(args.prompt_len)},
                                             {"role": "assistant", "content": " " + words(args.completion_len)}]}) + "\n")


def run_pmetal(args, work: Path, clock: StepClock) -> None:
    import lightning as L

    from pmetal.data.distill import DistillDataModule
    from pmetal.logps import backbone_and_head
    from pmetal.modules.distill import DistillModule

    cuda = args.device == "cuda"
    module = DistillModule(model=str(work / "student"), teacher_model=str(work / "teacher"), lmbda=args.lmbda,
                           beta=args.beta, temperature=SAMPLING_TEMPERATURE, max_completion_length=args.completion_len,
                           lora_r=args.lora_r, lora_alpha=2 * args.lora_r, learning_rate=1e-5,
                           gradient_checkpointing=args.checkpointing,
                           weight_dtype="bfloat16" if cuda else "float32")
    clock.wrap(module, "sample_batch", "generate")
    teacher_backbone = backbone_and_head(module.teacher)[0]  # what the loss runs: hidden states, then chunked heads
    clock.wrap(teacher_backbone, "forward", "teacher")
    data = DistillDataModule(str(work / "rows.jsonl"), batch_size=args.batch_size, val_fraction=0,
                             max_seq_len=args.prompt_len + args.completion_len + 8, chat_template=None)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps,
                        precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[clock.lightning()])
    trainer.fit(module, datamodule=data)


def run_trl(args, work: Path, clock: StepClock) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

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
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=load_dataset("json", data_files=str(work / "rows.jsonl"), split="train"),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[clock.trl()])
    clock.wrap(trainer, "generate_on_policy_outputs", "generate")  # HF generate (no KV cache under checkpointing)
    clock.wrap(trainer.teacher_model, "forward", "teacher")
    trainer.train()


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(args.device, warmup=args.warmup)
    (run_pmetal if args._worker == "pmetal" else run_trl)(args, Path(args._work), clock)
    seconds, timed = clock.seconds(), len(clock.timed())
    tokens = timed * args.batch_size * args.completion_len  # trained (completion) tokens
    print_result({"trainer": args._worker, "step_s": seconds / timed, "tokens_per_s": tokens / seconds,
                  "peak_gib": peak_gib(args.device), "setup_s": clock.setup_seconds(),
                  "first_step_s": clock.steps[0]["step"], **clock.phase_means(*PHASES)})


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
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if set(args.trainers.split(",")) - set(TRAINERS):
        parser.error(f"--trainers: expected a comma-separated subset of {TRAINERS}")
    if args._worker:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        t0 = time.perf_counter()
        prepare(args, Path(tmp))
        prepared = time.perf_counter() - t0
        print(f"models and rows written in {prepared:.1f} s", file=sys.stderr, flush=True)
        results = run_workers(__file__, argv, args.trainers.split(","), Path(tmp))
    report(results_table(args, results) + f"\n\nModels and rows written in {prepared:.1f} s.\n", args.markdown)


def results_table(args, results: list[dict]) -> str:
    """The step table, then where each step's time goes (mean seconds per timed step) and the set-up."""
    memory = "peak GPU memory allocated (GiB)" if args.device == "cuda" else "peak RSS (GiB)"
    shape = (f"student {args.student}, teacher {args.teacher}, {args.device}, LoRA r{args.lora_r}, "
             f"{args.batch_size} rows x {args.prompt_len}+{args.completion_len} tokens, lmbda {args.lmbda}, "
             f"beta {args.beta}, checkpointing {'on' if args.checkpointing else 'off'}, "
             f"{args.steps - args.warmup} timed steps")
    done = [r for r in results if "error" not in r]
    first = done[0]["step_s"] if done else 1.0
    table = [f"GKD step: {shape}", "", f"| trainer | s/step | trained tokens/s | {memory} | step time vs first |",
             "|---|---|---|---|---|"]
    table += [f"| {r['trainer']} | {r['step_s']:.3f} | {r['tokens_per_s']:.1f} | {r['peak_gib']:.2f} | "
              f"{r['step_s'] / first:.2f}x |" for r in done]
    table += [f"| {r['name']} | failed: {r['error'][:200]} | | | |" for r in results if "error" in r]
    table += ["", "| trainer | generate s/step | teacher forward s/step | rest s/step | first step s | setup s | "
              "worker s |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['trainer']} | {r['generate']:.3f} | {r['teacher']:.3f} | {r['other']:.3f} | "
              f"{r['first_step_s']:.2f} | {r['setup_s']:.1f} | {r['worker_s']:.1f} |" for r in done]
    return "\n".join(table)


if __name__ == "__main__":
    main()
