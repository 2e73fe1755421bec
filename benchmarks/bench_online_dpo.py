"""Online DPO throughput: pmetal's OnlineDpoModule beside TRL's OnlineDPOTrainer (no vLLM), same model and settings.

Per optimizer step: the rollout (two completions per prompt, generated and scored) in generated
tokens/s and the rest of the step (the reference and policy forwards, backward, optimizer) in
prompt + completion tokens/s. Each trainer runs in its own subprocess on the same prompts, the
word-level prompts of bench_grpo.py (one word = one token, no chat scaffolding). Shared settings:
LoRA r16 (alpha 32, every linear layer), `--prompts` prompts x 2 completions per step, sampling at
temperature 1 up to `--max-completion-length` tokens, the sigmoid loss with beta 0.1 against the
base without the adapter, every completion in one micro-batch, gradient checkpointing, bf16 on
CUDA / fp32 on CPU, the same cheap reward function (bench_grpo.py's). The first `--warmup` steps
are not timed. A random-weight model (the Qwen3 shape) almost never emits EOS, so every completion
runs to the limit: identical work for both. pmetal drops pairs whose rewards tie (TRL keeps them):
the reward's seven levels tie about one pair in seven, which only lowers pmetal's update work.

    # CPU smoke, the embedded SmolLM2-135M-Instruct
    python benchmarks/bench_online_dpo.py --device cpu --model default --prompts 2 \
        --prompt-len 16 --max-completion-length 16 --steps 1 --warmup 1
    # GPU, a Qwen3-0.6B-shaped model with random weights
    python benchmarks/bench_online_dpo.py --device cuda --model qwen3-0.6b-shape --prompts 32 \
        --prompt-len 256 --max-completion-length 256 --steps 5 --warmup 2

Prints a table; `--markdown FILE` appends it as Markdown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _timing import StepClock, load_peer_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from bench_grpo import fit_lightning, length_reward, rl_main, summary  # noqa: E402


def run_pmetal(args, model_dir: Path, prompts: Path) -> dict:
    import lightning as L

    from pmetal.modules.online_dpo import OnlineDpoModule

    def counts(batch) -> dict:  # the pairs that ranked: the rollout's metrics cover every completion
        rollout = batch["rollout"]
        return dict(rollout=rollout.metrics["rollout/seconds"],
                    generated=int(rollout.metrics["completions/mean_length"] * 2 * args.prompts),
                    update_tokens=int(rollout.attention_mask.sum()))

    L.seed_everything(0, verbose=False)
    module = OnlineDpoModule(str(model_dir), reward_fns=[length_reward], max_completion_length=args.max_completion_length,
                             temperature=1.0, beta=0.1, micro_batch_size=2 * args.prompts, learning_rate=1e-6, lora_r=16,
                             weight_dtype="bfloat16" if args.device == "cuda" else "float32",
                             gradient_checkpointing=True, max_grad_norm=1.0)
    return fit_lightning(args, module, prompts, "pmetal OnlineDpoModule", counts)


def run_trl(args, model_dir: Path, prompts: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    model, tokenizer = load_peer_model(model_dir, args.device)
    rows = [json.loads(line) for line in open(prompts)]
    clock = StepClock(args.device, warmup=args.warmup)
    config = OnlineDPOConfig(
        output_dir=str(model_dir.parent / "trl_out"), per_device_train_batch_size=args.prompts,
        max_new_tokens=args.max_completion_length, max_length=args.prompt_len + args.max_completion_length + 8,
        temperature=1.0, beta=[0.1], loss_type="sigmoid", learning_rate=1e-6, max_steps=args.warmup + args.steps,
        logging_steps=1, report_to=[], save_strategy="no", bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        gradient_checkpointing=True, max_grad_norm=1.0, seed=0,
    )
    trainer = OnlineDPOTrainer(model=model, reward_funcs=length_reward, args=config,
                               train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock.trl()],
                               peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    # the rollout: generation here, the rewards are scored after the forwards
    clock.wrap(trainer, "_generate", "rollout", counts=generation_counts)
    trainer.train()
    return summary("TRL OnlineDPOTrainer", clock, args.device)


def generation_counts(out) -> dict:
    """Generated and update tokens of OnlineDPOTrainer's `_generate` result (ids and masks)."""
    prompt_mask, completion_mask = out[1], out[3]
    return dict(generated=int(completion_mask.sum()), update_tokens=int(prompt_mask.sum() + completion_mask.sum()))


def main(argv=None) -> int:
    return rl_main(__file__, __doc__, "Online DPO", run_pmetal, run_trl, argv, model="default", prompt_len=16,
                   completion_len=16, steps=1, group=2)


if __name__ == "__main__":
    sys.exit(main())
