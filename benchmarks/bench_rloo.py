"""RLOO step: pmetal's `RlooModule` (`pmetal rloo`: GRPO's update with the leave-one-out advantage)
beside TRL 1.16's `RLOOTrainer` (no vLLM), same model, prompts and settings, one run.

bench_grpo.py's measurement with the other estimator: each trainer in its own subprocess (so its peak
memory is its own) on the same word-level prompts (one word = one token, no chat scaffolding). Shared
settings, read off `RLOOConfig`/`RLOOTrainer`: LoRA r16 (alpha 32, every linear layer),
`--prompts` prompts x `--num-generations` completions per step (the group the leave-one-out baseline
is taken over), sampling at temperature 1 (top-p 1, top-k off) up to `--max-completion-length`
tokens, advantages not normalized (TRL's `normalize_advantages=False`, pmetal's `scale_rewards="none"`),
beta 0 (no reference pass: TRL's default 0.05 puts a KL term into the reward and pmetal's default is
0), one update per rollout (`num_iterations=1`) with the whole rollout in one micro-batch, gradient
clipping at 1.0, gradient checkpointing, bf16 on CUDA / fp32 on CPU, bench_grpo's cheap reward. The
first `--warmup` steps are not timed. A random-weight model almost never emits EOS, so every
completion runs to the limit: identical work for both. Departures the timing keeps: TRL runs one more
no-grad forward per step (the old log-probs, which pmetal records while sampling) and takes the
sequence-summed log-ratio where pmetal's default loss averages tokens per sequence (the same work).

    # CPU smoke (tiny random model, seconds)
    python benchmarks/bench_rloo.py --device cpu --model tiny --prompts 2 --num-generations 4 \
        --prompt-len 16 --max-completion-length 16 --steps 1 --warmup 1
    # GPU, a Qwen3-0.6B-shaped model with random weights
    python benchmarks/bench_rloo.py --device cuda --model qwen3-0.6b-shape --prompts 8 --num-generations 8 \
        --prompt-len 128 --max-completion-length 128 --steps 3 --warmup 1

Prints a table (s/step, rollout and update tokens/s, peak memory, each worker's set-up and whole
time); `--markdown FILE` appends it as Markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _timing import StepClock, load_peer_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from bench_grpo import (fit_lightning, generation_counts, length_reward, rl_main, rollout_counts, start_update_phase,
                        summary)  # noqa: E402


def run_pmetal(args, model_dir: Path, prompts: Path) -> dict:
    import lightning as L

    from pmetal.modules.grpo import RlooModule

    L.seed_everything(0, verbose=False)
    module = RlooModule(str(model_dir), reward_fns=[length_reward], num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, temperature=1.0, beta=0.0,
                        num_iterations=1, micro_batch_size=args.prompts * args.num_generations, learning_rate=1e-6,
                        lora_r=16, lora_alpha=32, weight_dtype="bfloat16" if args.device == "cuda" else "float32",
                        gradient_checkpointing=True, max_grad_norm=1.0)
    return fit_lightning(args, module, prompts, "pmetal RlooModule", rollout_counts)


def run_trl(args, model_dir: Path, prompts: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RLOOConfig, RLOOTrainer

    model, tokenizer = load_peer_model(model_dir, args.device)
    rows = [json.loads(line) for line in open(prompts)]
    clock = StepClock(args.device, warmup=args.warmup)
    config = RLOOConfig(
        output_dir=str(model_dir.parent / "trl_out"), per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=1e-6, max_steps=args.warmup + args.steps, logging_steps=1, report_to=[],
        save_strategy="no", bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=True,
        beta=0.0, num_iterations=1, normalize_advantages=False, max_grad_norm=1.0, seed=0,
    )
    trainer = RLOOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[clock.trl()],
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    clock.wrap(trainer, "_generate", "rollout", counts=generation_counts)
    start_update_phase(trainer, "_generate", clock, after=True)
    trainer.train()
    return summary("TRL RLOOTrainer", clock, args.device)


def main(argv=None) -> int:
    return rl_main(__file__, __doc__, "RLOO", run_pmetal, run_trl, argv, model="tiny", prompt_len=16,
                   completion_len=16, steps=1)


if __name__ == "__main__":
    sys.exit(main())
