"""GRPO throughput: pmetal's GrpoModule beside TRL's GRPOTrainer (no vLLM), same model and settings.

Measures, per optimizer step, the rollout (generation + rewards) in generated tokens/s and the
policy update (forward + backward over prompt + completion tokens) in tokens/s. Each trainer runs
in its own subprocess on the same prompts: `--prompt-len` random words of a word-level tokenizer
written next to the model (one word = one token, no chat scaffolding), so both see identical prompt
ids. Shared settings: LoRA r16 (alpha 32, every linear layer), `--prompts` prompts x
`--num-generations` completions per step, sampling at temperature 1 up to `--max-completion-length`
tokens, beta 0 (no reference pass), loss "grpo", one update per rollout, the whole rollout in one
micro-batch, gradient checkpointing, bf16 on CUDA / fp32 on CPU, the same cheap reward function.
The first `--warmup` steps are not timed. A random-weight model (the Qwen3 shape) almost never
emits EOS, so every completion runs to the limit: identical work for both.

    # CPU, the embedded SmolLM2-135M-Instruct
    python benchmarks/bench_grpo.py --device cpu --model default --prompts 2 --num-generations 4 \
        --prompt-len 32 --max-completion-length 32 --steps 2 --warmup 1
    # GPU, a Qwen3-0.6B-shaped model with random weights
    python benchmarks/bench_grpo.py --device cuda --model qwen3-0.6b-shape --prompts 8 --num-generations 8 \
        --prompt-len 256 --max-completion-length 256 --steps 5 --warmup 2

Prints a table; `--markdown FILE` appends it as Markdown.
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

from _common import WORDS, report, write_model_dir  # noqa: E402  (benchmarks/ is on sys.path when run as a script)



def length_reward(prompts, completions, **kwargs):
    """Cheap and never constant across a group: the work measured is the trainer's, not the reward's."""
    return [(len(c) % 7) / 7.0 for c in completions]


def prepare(args, work: Path) -> tuple[Path, Path]:
    model_dir = write_model_dir(args.model, work)
    rng = random.Random(0)
    prompts = work / "prompts.jsonl"
    with open(prompts, "w") as f:
        for _ in range(args.prompts * (args.steps + args.warmup + 1)):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(3, WORDS)}" for _ in range(args.prompt_len))}) + "\n")
    return model_dir, prompts


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_pmetal(args, model_dir: Path, prompts: Path) -> dict:
    import lightning as L
    import torch

    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule

    class Timer(L.Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(args.device)
            rollout = batch["rollout"]
            self.steps.append(dict(step=time.perf_counter() - self.t0, rollout=rollout.metrics["rollout/seconds"],
                                   generated=int(rollout.completion_mask.sum()),
                                   update_tokens=int(rollout.attention_mask.sum())))

    L.seed_everything(0, verbose=False)
    module = GrpoModule(str(model_dir), reward_fns=[length_reward], num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, temperature=1.0,
                        micro_batch_size=args.prompts * args.num_generations, learning_rate=1e-6, lora_r=16,
                        weight_dtype="bfloat16" if args.device == "cuda" else "float32", gradient_checkpointing=True,
                        max_grad_norm=1.0)
    timer = Timer()
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=args.device, devices=1,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    trainer.fit(module, PromptDataModule(str(prompts), batch_size=args.prompts, max_prompt_length=4 * args.prompt_len))
    del torch
    return _summary("pmetal GrpoModule", timer.steps[args.warmup :], args.device)


def run_trl(args, model_dir: Path, prompts: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    rows = [json.loads(line) for line in open(prompts)]
    steps: list[dict] = []
    current: dict = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(args.device)
            current.clear()
            current.update(t0=time.perf_counter(), rollout=0.0, generated=0, update_tokens=0)

        def on_step_end(self, *a, **k):
            _sync(args.device)
            steps.append(dict(step=time.perf_counter() - current["t0"], rollout=current["rollout"],
                              generated=current["generated"], update_tokens=current["update_tokens"]))

    config = GRPOConfig(
        output_dir=str(model_dir.parent / "trl_out"), per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, temperature=1.0,
        learning_rate=1e-6, max_steps=args.warmup + args.steps, logging_steps=1, report_to=[], save_strategy="no",
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=True, beta=0.0,
        loss_type="grpo", num_iterations=1, max_grad_norm=1.0, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Timer()],
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    generate = trainer._generate

    def timed_generate(prompt_batch):
        _sync(args.device)
        t0 = time.perf_counter()
        out = generate(prompt_batch)
        _sync(args.device)
        prompt_ids, completion_ids = out[0], out[1]
        current["rollout"] = current.get("rollout", 0.0) + time.perf_counter() - t0
        current["generated"] = current.get("generated", 0) + sum(len(c) for c in completion_ids)
        current["update_tokens"] = current.get("update_tokens", 0) + sum(
            len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
        return out

    trainer._generate = timed_generate
    trainer.train()
    return _summary("TRL GRPOTrainer", steps[args.warmup :], args.device)


def _summary(name: str, steps: list[dict], device: str) -> dict:
    rollout = sum(s["rollout"] for s in steps)
    update = sum(s["step"] - s["rollout"] for s in steps)
    generated = sum(s["generated"] for s in steps)
    tokens = sum(s["update_tokens"] for s in steps)
    return dict(name=name, steps=len(steps), step_s=sum(s["step"] for s in steps) / max(len(steps), 1),
                rollout_tok_s=generated / max(rollout, 1e-9), update_tok_s=tokens / max(update, 1e-9),
                generated_per_step=generated / max(len(steps), 1), peak_gib=_peak_gib(device))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="default", help="default (SmolLM2-135M), qwen3-0.6b-shape, or an HF directory")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--only", choices=["pmetal", "trl"], default=None)
    p.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args._worker:
        work = Path(args._work)
        runner = run_pmetal if args._worker == "pmetal" else run_trl
        print("RESULT " + json.dumps(runner(args, work / "model", work / "prompts.jsonl")), flush=True)
        return 0

    results = run_workers(__file__, args, argv, prepare)
    header = (f"GRPO, {args.model} on {args.device}: {args.prompts} prompts x {args.num_generations} completions, "
              f"prompt {args.prompt_len} tokens, completions <= {args.max_completion_length}, {args.steps} timed steps")
    report(header + "\n\n" + results_table(results) + "\n", args.markdown)
    return 0


def run_workers(script: str, args, argv, prepare_inputs) -> list[dict]:
    """Run `script`'s pmetal and TRL workers (or `--only` one) in subprocesses on the same inputs; their results."""
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
        work = Path(tmp)
        prepare_inputs(args, work)
        passthrough, raw = [], list(argv if argv is not None else sys.argv[1:])
        while raw:  # drop --markdown and its value: the workers only print their result
            arg = raw.pop(0)
            if arg == "--markdown":
                raw.pop(0) if raw else None
            elif not arg.startswith("--markdown="):
                passthrough.append(arg)
        for worker in ([args.only] if args.only else ["pmetal", "trl"]):
            cmd = [sys.executable, script, *passthrough, "--_worker", worker, "--_work", str(work)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                results.append(dict(name=worker, error=" | ".join(tail)))
            else:
                results.append(json.loads(line[len("RESULT "):]))
    return results


def results_table(results: list[dict]) -> str:
    table = ["| trainer | s/step | rollout tokens/s | update tokens/s | generated/step | peak GiB |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            table.append(f"| {r['name']} | failed: {r['error'][:200]} | | | | |")
        else:
            table.append(f"| {r['name']} | {r['step_s']:.2f} | {r['rollout_tok_s']:.1f} | {r['update_tok_s']:.1f} | "
                         f"{r['generated_per_step']:.0f} | {r['peak_gib']:.2f} |")
    return "\n".join(table)


if __name__ == "__main__":
    sys.exit(main())
