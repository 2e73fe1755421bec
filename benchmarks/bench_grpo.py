"""GRPO throughput: pmetal's GrpoModule beside TRL's GRPOTrainer (no vLLM), same model and settings.

Measures, per optimizer step, the rollout (generation + rewards) in generated tokens/s and the
policy update (forward + backward over prompt + completion tokens) in tokens/s. Each trainer runs
in its own subprocess on the same prompts: `--prompt-len` random words of a word-level tokenizer
written next to the model (one word = one token, no chat scaffolding), so both see identical prompt
ids. Shared settings: LoRA r16 (alpha 32, every linear layer), `--prompts` prompts x
`--num-generations` completions per step, sampling at temperature 1 up to `--max-completion-length`
tokens, beta 0 (no reference pass), loss "grpo", one update per rollout, the whole rollout in one
micro-batch, gradient checkpointing, bf16 on CUDA / fp32 on CPU, the same cheap reward function.
The first `--warmup` steps are not timed. On CUDA the table also profiles the update's memory:
what is allocated as the update starts (`held at update`: the rollout's tensors, the weights and
optimizer state, and whatever the generator keeps alive between rollouts) and the update's own peak. A random-weight model (the Qwen3 shape) almost never
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
import sys
from pathlib import Path

from _common import WORDS, report, write_model_dir  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _timing import StepClock, add_worker_arguments, load_peer_model, run_contenders  # noqa: E402


def length_reward(prompts, completions, **kwargs):
    """Cheap and never constant across a group: the work measured is the trainer's, not the reward's."""
    return [(len(c) % 7) / 7.0 for c in completions]


def prepare(args, work: Path) -> tuple[Path, Path]:
    model_dir = write_model_dir(args.model, work, device=args.device)
    rng = random.Random(0)
    prompts = work / "prompts.jsonl"
    with open(prompts, "w") as f:
        for _ in range(args.prompts * (args.steps + args.warmup + 1)):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(3, WORDS)}" for _ in range(args.prompt_len))}) + "\n")
    return model_dir, prompts


def run_pmetal(args, model_dir: Path, prompts: Path) -> dict:
    import lightning as L

    from pmetal.modules.grpo import GrpoModule

    L.seed_everything(0, verbose=False)
    module = GrpoModule(str(model_dir), reward_fns=[length_reward], num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, temperature=1.0,
                        micro_batch_size=args.prompts * args.num_generations, learning_rate=1e-6, lora_r=16,
                        weight_dtype="bfloat16" if args.device == "cuda" else "float32", gradient_checkpointing=True,
                        max_grad_norm=1.0)
    return fit_lightning(args, module, prompts, "pmetal GrpoModule", rollout_counts)


def rollout_counts(batch) -> dict:
    """The rollout seconds, generated tokens and update tokens of a pmetal training batch."""
    rollout = batch["rollout"]
    return dict(rollout=rollout.metrics["rollout/seconds"], generated=int(rollout.completion_mask.sum()),
                update_tokens=int(rollout.attention_mask.sum()))


def fit_lightning(args, module, prompts: Path, name: str, counts) -> dict:
    """Train `module` on the prompts for warmup + steps batches under the step clock; its summary."""
    import lightning as L

    from pmetal.data.prompts import PromptDataModule

    clock = StepClock(args.device, warmup=args.warmup)
    start_update_phase(module, "training_step", clock)  # the rollout is in the batch: the rest is the update
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=args.device, devices=1,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock.lightning(counts)])
    trainer.fit(module, PromptDataModule(str(prompts), batch_size=args.prompts, max_prompt_length=4 * args.prompt_len))
    return summary(name, clock, args.device)


def run_trl(args, model_dir: Path, prompts: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_peer_model(model_dir, args.device)
    rows = [json.loads(line) for line in open(prompts)]
    clock = StepClock(args.device, warmup=args.warmup)

    config = GRPOConfig(
        output_dir=str(model_dir.parent / "trl_out"), per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, temperature=1.0,
        learning_rate=1e-6, max_steps=args.warmup + args.steps, logging_steps=1, report_to=[], save_strategy="no",
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=True, beta=0.0,
        loss_type="grpo", num_iterations=1, max_grad_norm=1.0, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[clock.trl()],
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    clock.wrap(trainer, "_generate", "rollout", counts=generation_counts)
    start_update_phase(trainer, "_generate", clock, after=True)
    trainer.train()
    return summary("TRL GRPOTrainer", clock, args.device)


def start_update_phase(owner, attribute: str, clock: StepClock, *, after: bool = False) -> None:
    """The update's memory phase starts as `owner.attribute` is called (or, `after`, once it returns):
    what is held then (the rollout's tensors, and whatever the generator keeps between rollouts) and
    the update's own peak go in the table."""
    original = getattr(owner, attribute)

    def marked(*args, **kwargs):
        if not after:
            clock.memory_phase("update")
        result = original(*args, **kwargs)
        if after:
            clock.memory_phase("update")
        return result

    setattr(owner, attribute, marked)


def generation_counts(out) -> dict:
    """Generated and update tokens of TRL's `_generate` result (prompt ids, completion ids, ...)."""
    prompt_ids, completion_ids = out[0], out[1]
    return dict(generated=sum(len(c) for c in completion_ids),
                update_tokens=sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)))


def summary(name: str, clock: StepClock, device: str) -> dict:
    """s/step, rollout and update tokens/s (the update: the step less its rollout) and peak memory."""
    steps = clock.timed()
    rollout = sum(s.get("rollout", 0.0) for s in steps)
    update = sum(s["step"] - s.get("rollout", 0.0) for s in steps)
    generated = sum(s.get("generated", 0) for s in steps)
    tokens = sum(s.get("update_tokens", 0) for s in steps)
    return dict(name=name, steps=len(steps), step_s=clock.seconds() / max(len(steps), 1),
                rollout_tok_s=generated / max(rollout, 1e-9), update_tok_s=tokens / max(update, 1e-9),
                generated_per_step=generated / max(len(steps), 1), peak_gib=clock.run_peak_gib(),
                held_at_update_gib=_most(steps, "update_held_gib"), update_peak_gib=_most(steps, "update_peak_gib"),
                setup_s=clock.setup_seconds())


def main(argv=None) -> int:
    return rl_main(__file__, __doc__, "GRPO", run_pmetal, run_trl, argv, model="default", prompt_len=32,
                   completion_len=32, steps=2)


def rl_main(script: str, doc: str, method: str, run_pmetal, run_trl, argv=None, *, model: str, prompt_len: int,
            completion_len: int, steps: int, group: int | None = None) -> int:
    """The command line of the GRPO-family benchmarks (this one, RLOO, Online DPO): parse, then either
    run one worker (`run_pmetal`/`run_trl`) or prepare the inputs, run both workers and print the table.
    `group` fixes the completions per prompt (Online DPO's 2); None makes it `--num-generations`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=model,
                   help="default (SmolLM2-135M), tiny or qwen3-0.6b-shape (random weights), or an HF directory")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    if group is None:
        p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (the group)")
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    p.add_argument("--max-completion-length", type=int, default=completion_len)
    p.add_argument("--steps", type=int, default=steps, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--only", choices=["pmetal", "trl"], default=None)
    p.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    add_worker_arguments(p)
    args = p.parse_args(argv)
    if group is not None:
        args.num_generations = group
    results = run_contenders(script, argv, args, prepare, {"pmetal": run_pmetal, "trl": run_trl})
    if results is None:
        return 0
    header = (f"{method}, {args.model} on {args.device}: {args.prompts} prompts x {args.num_generations} completions, "
              f"prompt {args.prompt_len} tokens, completions <= {args.max_completion_length}, {args.steps} timed steps")
    report(header + "\n\n" + results_table(results) + "\n", args.markdown)
    return 0


def _most(steps: list[dict], key: str) -> float:
    values = [s[key] for s in steps if key in s]
    return max(values) if values else float("nan")


def results_table(results: list[dict]) -> str:
    """The step table; `setup s` is a worker's time to its first step (imports, loads), `worker s` its whole run."""
    table = ["| trainer | s/step | rollout tokens/s | update tokens/s | generated/step | peak GiB | held at update GiB "
             "| update peak GiB | setup s | worker s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            table.append(f"| {r['name']} | failed: {r['error'][:200]} | | | | | | | | |")
        else:
            table.append(f"| {r['name']} | {r['step_s']:.2f} | {r['rollout_tok_s']:.1f} | {r['update_tok_s']:.1f} | "
                         f"{r['generated_per_step']:.0f} | {r['peak_gib']:.2f} | {r.get('held_at_update_gib', float('nan')):.2f} | "
                         f"{r.get('update_peak_gib', float('nan')):.2f} | {r['setup_s']:.1f} | {r['worker_s']:.1f} |")
    return "\n".join(table)


if __name__ == "__main__":
    sys.exit(main())
